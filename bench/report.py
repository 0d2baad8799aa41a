"""Turn run results (one JSON-able dict per run) into a markdown report and PNG plots."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

VARIANTS = ("radix", "nocache", "hf")  # cache on, cache off, transformers baseline
LABELS = {"radix": "radixrt cache on", "nocache": "radixrt cache off", "hf": "HF generate"}
COLORS = {"radix": "tab:blue", "nocache": "tab:orange", "hf": "tab:gray"}
# Issue 7's targets: max gap between measured and optimal hit rate per workload.
HIT_GAP = {"gsp": 0.01, "rag": 0.02, "fewshot": 0.02, "chat": 0.02}
SPEEDUP_SHARE = 0.8  # measured speedup >= this share of the ideal one
FLOOR_RATIO = 1.5  # e2e time with the cache <= this times the optimal-hit floor
CHAT_TURN_RATIO = 1.5  # chat: TTFT(turn 8) <= this times TTFT(turn 1), cache on


Run = Mapping[str, Any]


def _by(runs: Sequence[Run]) -> dict[str, dict[str, Run]]:
    out: dict[str, dict[str, Run]] = {}
    for r in runs:
        out.setdefault(r["workload"], {})[r["variant"]] = r
    return out


def targets(runs_of_workload: Mapping[str, Run], floors: Mapping[str, Any] | None) -> list[str]:
    """Pass/miss lines for issue 7's targets that this workload's runs can judge."""
    lines: list[str] = []
    on, off = runs_of_workload.get("radix"), runs_of_workload.get("nocache")
    name = next(iter(runs_of_workload.values()))["workload"]
    if on is not None and name in HIT_GAP:
        gap = on["optimal_hit_rate"] - on["metrics"]["hit_rate"]
        ok = gap <= HIT_GAP[name]
        lines.append(f"hit rate {on['metrics']['hit_rate']:.3f} vs optimal "
                     f"{on['optimal_hit_rate']:.3f} (gap {gap:.3f}, target <= {HIT_GAP[name]}): "
                     f"{'PASS' if ok else 'MISS'}")
    if on is not None and off is not None and floors is not None:
        measured = off["metrics"]["duration_s"] / max(on["metrics"]["duration_s"], 1e-9)
        ideal = floors["ideal_speedup"]
        ok = measured >= SPEEDUP_SHARE * ideal
        lines.append(f"speedup {measured:.2f}x vs ideal {ideal:.2f}x (share {measured / ideal:.2f},"
                     f" target >= {SPEEDUP_SHARE}): {'PASS' if ok else 'MISS'}")
    if on is not None and floors is not None:
        ratio = on["metrics"]["duration_s"] / floors["optimal"]["total_s"]
        bw = floors["optimal"].get("bandwidth_total_s")
        also = f"; bandwidth floor: {on['metrics']['duration_s'] / bw:.2f}" if bw else ""
        lines.append(f"time / floor {ratio:.2f} (compute-aware, target <= {FLOOR_RATIO}"
                     f"{also}): {'PASS' if ratio <= FLOOR_RATIO else 'MISS'}")
    if on is not None and name == "chat":
        by_turn = {int(k): v for k, v in on.get("ttft_by_turn", {}).items()}
        last = max(by_turn) if by_turn else 0
        if last > 1 and by_turn.get(1):
            ratio = by_turn[last] / by_turn[1]
            lines.append(f"TTFT turn {last} / turn 1 = {ratio:.2f} (target <= {CHAT_TURN_RATIO}): "
                         f"{'PASS' if ratio <= CHAT_TURN_RATIO else 'MISS'}")
    return lines


def markdown(runs: Sequence[Run], floors: Mapping[str, Mapping[str, Any]],
             header: Mapping[str, Any]) -> str:
    ms = 1e3
    out = ["# radixrt benchmark", ""]
    out += [f"- {k}: {v}" for k, v in header.items()]
    out += ["", "| workload | variant | reqs | time s | req/s | in tok/s | out tok/s | TTFT mean / p99 ms"
            " | TPOT mean ms | ITL p50 ms | e2e p50 s | hit | optimal | peak pages |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by = _by(runs)
    for name, variants in by.items():
        for v in VARIANTS:
            if v not in variants:
                continue
            r, m = variants[v], variants[v]["metrics"]
            out.append(
                f"| {name} | {v} | {m['completed']} | {m['duration_s']:.2f} | "
                f"{m['request_throughput']:.2f} | {m['input_throughput']:.0f} | "
                f"{m['output_throughput']:.0f} | {m['ttft_s']['mean'] * ms:.1f} / "
                f"{m['ttft_s']['p99'] * ms:.1f} | {m['tpot_s']['mean'] * ms:.2f} | "
                f"{m['itl_s']['p50'] * ms:.2f} | {m['e2e_s']['p50']:.2f} | {m['hit_rate']:.3f} | "
                f"{r['optimal_hit_rate']:.3f} | {r.get('peak_pages_used', 0)} |")
    if floors:
        # Floors: compute-aware (max of compute and memory time per operation; the targets use
        # it) and the bandwidth floor (all bytes / bandwidth), as bench/floor.py defines them.
        out += ["", "| workload | floor cache off s | floor optimal s | bandwidth floor optimal s"
                " | ideal speedup | measured speedup | time / floor (cache on) | time / bandwidth "
                "floor |", "|---|---|---|---|---|---|---|---|"]
        for name, f in floors.items():
            variants = by.get(name, {})
            on, off = variants.get("radix"), variants.get("nocache")
            meas = (f"{off['metrics']['duration_s'] / on['metrics']['duration_s']:.2f}x"
                    if on and off else "-")
            ratio = f"{on['metrics']['duration_s'] / f['optimal']['total_s']:.2f}" if on else "-"
            bw = f["optimal"].get("bandwidth_total_s")
            bw_s = f"{bw:.3f}" if bw else "-"
            bw_ratio = f"{on['metrics']['duration_s'] / bw:.2f}" if on and bw else "-"
            out.append(f"| {name} | {f['cache_off']['total_s']:.3f} | {f['optimal']['total_s']:.3f}"
                       f" | {bw_s} | {f['ideal_speedup']:.2f}x | {meas} | {ratio} | {bw_ratio} |")
    out += ["", "## Targets (issue 7)", ""]
    for name, variants in by.items():
        for line in targets(variants, floors.get(name)):
            out.append(f"- {name}: {line}")
    for name, variants in by.items():
        hf = variants.get("hf")
        if hf and hf.get("engine", {}).get("requests_run", 0) < hf.get("num_requests", 0):
            out.append(f"- {name}: the HF baseline ran the first {hf['engine']['requests_run']} of "
                       f"{hf['num_requests']} requests (--hf-max-requests)")
    return "\n".join(out) + "\n"


def plots(runs: Sequence[Run], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = _by(runs)
    names = list(by)
    written: list[Path] = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(VARIANTS)
    for ax, key, title in ((axes[0], "output_throughput", "output throughput (tok/s)"),
                           (axes[1], "ttft_s", "mean TTFT (s)")):
        for j, v in enumerate(VARIANTS):
            xs, ys = [], []
            for i, n in enumerate(names):
                if v in by[n]:
                    m = by[n][v]["metrics"][key]
                    xs.append(i + (j - 1) * width)
                    ys.append(m["mean"] if isinstance(m, dict) else m)
            if xs:
                ax.bar(xs, ys, width, label=LABELS[v], color=COLORS[v])
        ax.set_xticks(range(len(names)), names)
        ax.set_title(title)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    written.append(_save(fig, out_dir / "throughput_ttft.png", plt))

    with_cache = [n for n in names if "radix" in by[n]]
    if with_cache:
        fig, ax = plt.subplots(figsize=(6, 4))
        pos = range(len(with_cache))
        ax.bar([x - 0.2 for x in pos], [by[n]["radix"]["metrics"]["hit_rate"] for n in with_cache],
               0.4, label="measured", color=COLORS["radix"])
        ax.bar([x + 0.2 for x in pos], [by[n]["radix"]["optimal_hit_rate"] for n in with_cache],
               0.4, label="optimal (unbounded trie)", color="tab:green")
        ax.set_xticks(list(pos), with_cache)
        ax.set_ylim(0, 1)
        ax.set_title("prefix cache hit rate")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(_save(fig, out_dir / "hit_rate.png", plt))

    if "chat" in by:
        fig, ax = plt.subplots(figsize=(6, 4))
        for v, r in by["chat"].items():
            turns = sorted((int(k), t) for k, t in r.get("ttft_by_turn", {}).items())
            if turns:
                ax.plot([t for t, _ in turns], [x * 1e3 for _, x in turns], marker="o",
                        label=LABELS.get(v, v), color=COLORS.get(v))
        ax.set_xlabel("turn")
        ax.set_ylabel("mean TTFT (ms)")
        ax.set_title("chat: TTFT vs turn index")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(_save(fig, out_dir / "chat_ttft_by_turn.png", plt))
    return written


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
