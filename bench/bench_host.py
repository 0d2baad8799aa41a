"""Host time of one decode step's metadata (issue 11): ``step_builder.build`` at steady state.

    python bench/bench_host.py [--steps 15] [--shapes 256x4096,...] [--no-old] [--out FILE]

For each shape, B sequences are decoding (page size 16); the first step binds their rows of the
device page table and writes all their pages, every later step writes only the pages crossed
into. Context lengths are staggered by up to 15 tokens so about 1/16 of the sequences cross a
page boundary each step, as in a real decode batch. Between timed steps each sequence gets its
token and, when it needs one, its next page (the scheduler's work, not timed).

``host_ms`` is the median over the timed steps of ``build`` (page-table staging + flush, token
and slot arrays, the two packed host->device copies), on a CPU device table: the host-side cost
the GPU would otherwise wait for. ``old_ms`` (unless --no-old) times what the engine did before
(``build_forward_batch`` at commit OLD_COMMIT, loaded from git): a padded [B, max_pages] table
rebuilt from the page lists every step. One JSON line per shape.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from radixrt.cache.device_pages import DevicePageTable, rows_needed  # noqa: E402
from radixrt.cache.page_table import SequencePages  # noqa: E402
from radixrt.engine import step_builder  # noqa: E402
from radixrt.engine.request import SeqStatus, Sequence  # noqa: E402
from radixrt.sampling_params import SamplingParams  # noqa: E402

PAGE = 16
OLD_COMMIT = "a2c537c"  # the last commit before the device page table
SHAPES = "256x4096,256x32768,256x131072,1024x8192,255x1024+1x131072"


def parse_shape(text: str) -> list[int]:
    """'255x1024+1x131072' -> 255 lengths of 1024 then one of 131072."""
    lens: list[int] = []
    for part in text.split("+"):
        count, length = part.split("x")
        lens += [int(length)] * int(count)
    return lens


class Workload:
    """Decoding sequences whose pages come from a counter (what the allocator would hand out)."""

    def __init__(self, lens: list[int]) -> None:
        prompt = [7] * (max(lens) - 1)  # shared by all: the builder only slices it
        params = SamplingParams(max_new_tokens=1 << 30)
        self.next_page = 1
        self.seqs: list[Sequence] = []
        for i, n in enumerate(lens):
            n -= i % PAGE  # stagger page crossings
            seq = Sequence(rid=f"r{i}", index=0, prompt_ids=prompt[: n - 2], params=params,
                           namespace=None, arrival=i, pages=SequencePages(PAGE))
            seq.output_ids = [5, 5]
            seq.kv_len = n - 1  # the newest token is the one to compute
            seq.status = SeqStatus.RUNNING
            self._grow(seq, n)
            self.seqs.append(seq)

    def _grow(self, seq: Sequence, tokens: int) -> None:
        pages = seq.pages
        while pages.num_pages * PAGE < tokens:
            pages.append_pages([self.next_page])
            self.next_page += 1
        pages.num_tokens = tokens

    def advance(self) -> None:
        """The step ran: every sequence gets its token and room for the next one."""
        for seq in self.seqs:
            seq.kv_len += 1
            seq.output_ids.append(5)
            self._grow(seq, seq.num_tokens)


def load_old_builder() -> Any | None:
    """``build_forward_batch`` as it was at OLD_COMMIT, or None outside a git checkout."""
    try:
        src = subprocess.run(["git", "show", f"{OLD_COMMIT}:radixrt/engine/batch.py"],
                             capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parents[1]).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    mod = types.ModuleType("old_batch")
    sys.modules[mod.__name__] = mod  # dataclasses look their module up there
    exec(compile(src, "old_batch.py", "exec"), mod.__dict__)  # noqa: S102 - our own history
    return mod.build_forward_batch


def time_old(old: Any, seqs: list[Sequence], steps: int) -> float:
    """The old step: per-request token lists + full page lists into the padded table."""
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        old(new_token_ids=[step_builder.token_slice(s, s.kv_len, s.kv_len + 1) for s in seqs],
            prefix_lens=[s.kv_len for s in seqs], page_tables=[s.pages.pages for s in seqs],
            page_size=PAGE, logits_rows=[[0]] * len(seqs), device="cpu")
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def run_shape(shape: str, steps: int, old: Any | None) -> dict[str, Any]:
    lens = parse_shape(shape)
    work = Workload(lens)
    max_pages = -(-max(lens) // PAGE) + 2
    table = DevicePageTable(num_rows=rows_needed(len(lens)), max_pages=max_pages,
                            page_size=PAGE, device="cpu")
    batch_work = [(s, 1) for s in work.seqs]
    t = time.perf_counter()
    step_builder.build(batch_work, table)  # first step: binds rows, writes every page
    first_ms = (time.perf_counter() - t) * 1e3
    first_entries = table.entries_written
    work.advance()
    times, written = [], []
    for _ in range(steps):
        before = table.entries_written
        t = time.perf_counter()
        step_builder.build(batch_work, table)
        times.append(time.perf_counter() - t)
        written.append(table.entries_written - before)
        work.advance()
    res: dict[str, Any] = {
        "shape": shape, "page_size": PAGE, "requests": len(lens), "tokens": sum(lens),
        "host_ms": round(statistics.median(times) * 1e3, 3),
        "host_ms_max": round(max(times) * 1e3, 3), "steps": steps,
        "entries_written_per_step": statistics.mean(written),
        "first_step_ms": round(first_ms, 3), "first_step_entries": first_entries,
    }
    if old is not None:
        res["old_ms"] = round(time_old(old, work.seqs, max(3, steps // 3)), 3)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--shapes", default=SHAPES)
    ap.add_argument("--no-old", action="store_true", help="skip timing the pre-change path")
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    a = ap.parse_args()
    old = None if a.no_old else load_old_builder()
    for shape in a.shapes.split(","):
        line = json.dumps(run_shape(shape, a.steps, old))
        print(line, flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
