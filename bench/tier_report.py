"""Summarize bench/gpu_tier.sh: chat with the host tier on vs off, RAG after GPU eviction, and
the page-copy bandwidth, as one markdown table set (stdout and --out).

The chat floor gets the *needed* host loads added at the measured page-load bandwidth
(``floor + host-hit bytes / load GB/s``): a load is work the optimal-hit floor does not count,
but only the tokens requests actually read from the host need loading; counting every loaded
byte would excuse loads that were thrown away and loaded again. Waste ratio = bytes loaded /
host-hit bytes (1.0: every load was read); "wasted pages" were evicted before any request read
them. Also: plain time / floor, and tier-on wall time over tier-off.
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


def _chat_row(r: dict[str, Any], load_bw: float | None, off_s: float | None) -> str:
    m, eng = r["metrics"], r.get("engine", {})
    floor = r["floor"]["optimal"]["total_s"] if r.get("floor") else float("nan")
    loaded = float(eng.get("host_bytes_loaded", 0.0))
    bound = ""
    if "host_loaded_tokens" in eng:
        loaded_tok, used_tok = float(eng["host_loaded_tokens"]), float(eng["host_hit_tokens"])
    else:  # results from before the waste stats: host_hit_tokens counted every loaded token,
        # and all cached tokens (both tiers) bound the host hits from above
        loaded_tok, used_tok = float(eng.get("host_hit_tokens", 0.0)), float(m["cached_tokens"])
        bound = "<= " if loaded else ""
    bpt = loaded / loaded_tok if loaded_tok else 0.0  # bytes per token (all layers, K and V)
    needed = used_tok * bpt
    load_s = needed / (load_bw * 1e9) if load_bw else 0.0
    waste = f"{'>= ' if bound else ''}{loaded / needed:.2f}" if needed else "-"
    ttft = {int(k): v for k, v in r.get("ttft_by_turn", {}).items()}
    last = max(ttft) if ttft else None
    ratio = ttft[last] / ttft[1] if last and ttft.get(1) else float("nan")
    opt = r["optimal_hit_rate"]
    dur = m["duration_s"]
    on = bool(r.get("host_kv_cache_tokens"))
    vs_off = f"{dur / off_s:.2f}" if on and off_s else "-"
    return (f"| {'on' if on else 'off'} | {eng.get('total_pages', '?')} pages | "
            f"{r.get('host_kv_cache_tokens', 0)} | {m['hit_rate']:.3f} | {opt:.3f} | "
            f"{m['hit_rate'] / opt if opt else float('nan'):.3f} | {dur:.1f} | {floor:.1f} | "
            f"{dur / floor:.2f} | {bound}{floor + load_s:.1f} | {bound.replace('<', '>')}"
            f"{dur / (floor + load_s):.2f} | "
            f"{ratio:.2f} (turn {last}) | {bound}{needed / 1e9:.2f} | {loaded / 1e9:.2f} | {waste} | "
            f"{eng.get('host_load_wasted_pages', '-')} | "
            f"{float(eng.get('host_bytes_written', 0.0)) / 1e9:.2f} | {vs_off} |")


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
    # Loads run at the tier's page-copy bandwidth (at the engine's staging size, 64 pages, else
    # the last measured), else at the contiguous pinned H2D bandwidth.
    loads = [r for r in xfer if r["kind"] == "tier_load"]
    load_bw = next((r["GB/s"] for r in loads if r.get("staging_pages") == 64),
                   loads[-1]["GB/s"] if loads else h2d)
    lines += ["## Chat", "", f"Needed loads counted at {load_bw} GB/s (page loads).", "",
              "| tier | GPU pool | host tier | hit rate | optimal | hit / optimal | time s | "
              "floor s | time / floor | floor + needed loads s | time / (floor + loads) | "
              "TTFT turn 8 / turn 1 | host-hit GB | loaded GB | waste ratio | wasted pages | "
              "written GB | time / tier off |", "|" + "---|" * 18]
    runs = {tag: _runs(root / tag) for tag in ("chat_on", "chat_off")}
    off_s = next((r["metrics"]["duration_s"] for r in runs["chat_off"]), None)
    for tag in ("chat_on", "chat_off"):
        for r in runs[tag]:
            lines.append(_chat_row(r, load_bw, off_s))
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
