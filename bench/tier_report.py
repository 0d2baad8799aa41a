"""Summarize bench/gpu_tier.sh: chat with the host tier on vs off, RAG after GPU eviction, and
the page-copy bandwidth, as one markdown table set (stdout and --out).

The chat floor gets the host loads added at the measured contiguous pinned H2D bandwidth
(``floor + loaded bytes / H2D``): a load is work the optimal-hit floor does not count.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _runs(folder: Path) -> list[dict[str, Any]]:
    out = []
    for p in sorted(folder.glob("chat_*.json")):
        r = json.loads(p.read_text())
        if isinstance(r, dict) and "metrics" in r:
            out.append(r)
    return out


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("folder")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    root = Path(args.folder)
    lines: list[str] = []
    xfer = _jsonl(root / "transfer.jsonl")
    h2d = next((r["GB/s"] for r in xfer if r["kind"] == "contiguous_h2d"), None)
    if xfer:
        lines += ["## Page copies (host <-> device)", "",
                  "| kind | staging pages | GB/s | fraction of contiguous |", "|---|---|---|---|"]
        lines += [f"| {r['kind']} | {r.get('staging_pages', '-')} | {r['GB/s']} | "
                  f"{r.get('fraction', '-')} |" for r in xfer]
        lines.append("")
    lines += ["## Chat", "", "| tier | GPU pool | host tier | hit rate | optimal | hit / optimal | "
              "time s | floor s | floor + loads s | time / (floor + loads) | TTFT turn 8 / turn 1 "
              "| loaded GB | written GB |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for tag in ("chat_on", "chat_off"):
        for r in _runs(root / tag):
            m, eng = r["metrics"], r.get("engine", {})
            floor = r["floor"]["optimal"]["total_s"] if r.get("floor") else float("nan")
            loaded = float(eng.get("host_bytes_loaded", 0.0))
            load_s = loaded / (h2d * 1e9) if h2d else 0.0
            ttft = {int(k): v for k, v in r.get("ttft_by_turn", {}).items()}
            last = max(ttft) if ttft else None
            ratio = ttft[last] / ttft[1] if last and ttft.get(1) else float("nan")
            opt = r["optimal_hit_rate"]
            lines.append(
                f"| {'on' if r.get('host_kv_cache_tokens') else 'off'} | {eng.get('total_pages', '?')}"
                f" pages | {r.get('host_kv_cache_tokens', 0)} | {m['hit_rate']:.3f} | {opt:.3f} | "
                f"{m['hit_rate'] / opt if opt else float('nan'):.3f} | {m['duration_s']:.1f} | "
                f"{floor:.1f} | {floor + load_s:.1f} | {m['duration_s'] / (floor + load_s):.2f} | "
                f"{ratio:.2f} (turn {last}) | {loaded / 1e9:.1f} | "
                f"{float(eng.get('host_bytes_written', 0.0)) / 1e9:.1f} |")
    rag = _jsonl(root / "rag.jsonl")
    if rag:
        lines += ["", "## RAG: a document evicted from the GPU, asked again", "",
                  "| host tier | doc tokens | cold TTFT s | GPU-hit TTFT s | after eviction s | "
                  "after / cold | cached_tokens (cold, hit, after) |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['host_kv_cache_tokens']} | {r['doc_tokens']} | {r['cold_s']} | "
                  f"{r['gpu_hit_s']} | {r['after_s']} | {r['after_over_cold']} | "
                  f"{r['cached_tokens']} |" for r in rag]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
