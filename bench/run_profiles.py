"""run_bench.py --profile / --cprofile: a workload run once more under torch.profiler (kernel time
per group, GPU busy vs wall) or under cProfile (host time by function, host-device syncs by line).
The timed numbers stay those of the unprofiled run."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from bench.workloads import Workload


def profile_run(core: Any, w: Workload, variant: str, out_dir: Path) -> None:
    """The same workload again (cold cache) under the profiler; the timed numbers stay the
    unprofiled run's."""
    from torch.profiler import ProfilerActivity, profile

    from bench.kernel_groups import profile_summary
    from bench.offline import run_offline

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run_offline(core, w, progress=False)
        torch.cuda.synchronize()
    summary = profile_summary(prof, time.perf_counter() - t0)
    core.flush_cache()
    (out_dir / f"{w.name}_{variant}_profile.json").write_text(json.dumps(summary, indent=1))
    print(f"[{w.name}/{variant}] profiled: wall {summary['wall_ms']:.0f} ms, GPU busy "
          f"{summary['gpu_busy_ms']:.0f} ms, groups {summary['groups_ms']}", flush=True)


def cprofile_run(core: Any, w: Workload, variant: str, out_dir: Path) -> None:
    """The same workload again (cold cache) under cProfile: where the host's time goes."""
    import cProfile
    import io
    import pstats

    from bench.offline import run_offline

    cuda = str(core.config.device).startswith("cuda")
    prof = cProfile.Profile()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:  # every host<->device sync the run makes, as a warning at its Python line
            torch.cuda.set_sync_debug_mode("warn")
        t0 = time.perf_counter()
        prof.enable()
        try:
            run_offline(core, w, progress=False)
        finally:
            prof.disable()
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    wall = time.perf_counter() - t0
    core.flush_cache()
    syncs: dict[str, int] = {}
    for c in caught:
        if "synchroniz" in str(c.message):
            where = f"{c.filename}:{c.lineno}"
            syncs[where] = syncs.get(where, 0) + 1
    buf = io.StringIO()
    buf.write(f"{w.name}/{variant} under cProfile: wall {wall:.3f} s\n")
    buf.write(f"host-device syncs by Python line ({sum(syncs.values())} in all):\n")
    for where, n in sorted(syncs.items(), key=lambda kv: -kv[1])[:30]:
        buf.write(f"  {n:7d}  {where}\n")
    for key in ("tottime", "cumulative"):
        pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(45)
    (out_dir / f"{w.name}_{variant}_cprofile.txt").write_text(buf.getvalue())
    print(f"[{w.name}/{variant}] cProfile: wall {wall:.2f} s", flush=True)
