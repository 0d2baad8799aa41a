"""Host <-> device KV page copies: the host tier's transfer path against the hardware limit.

Prints one JSON line per measurement (and writes them to --out):
  contiguous_h2d / contiguous_d2h   one large pinned <-> device copy: the PCIe limit here
  tier_load / tier_write            PageTransfer on random (scattered) page ids, page-major host
                                    pool, device-side gather/scatter (what the engine runs)
  naive_load / naive_write          torch advanced indexing straight between the pools
                                    (host side not page-major; a synchronous baseline)
``fraction`` is GB/s over the contiguous copy in the same direction (the issue's target: >= 0.8).
On CPU both pools are in RAM, so the numbers are memcpy speeds (a dry run of the same code).

    python bench/bench_transfer.py --device cuda --model-shape llama3-8b --pages 512
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from radixrt.cache.host_pool import HostKVPool
from radixrt.cache.kv_pool import KVPool
from radixrt.cache.transfer import PageTransfer

SHAPES = {  # (layers, kv heads, head dim)
    "llama3-8b": (32, 8, 128),
    "tiny": (2, 2, 16),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Any, device: torch.device, iters: int) -> float:
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model-shape", choices=sorted(SHAPES), default="llama3-8b")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--pages", type=int, default=512, help="pages per copy")
    p.add_argument("--pool-pages", type=int, default=4096, help="GPU and host pool size")
    p.add_argument("--staging-pages", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--out", default=None, help="JSON-lines file")
    args = p.parse_args()
    device = torch.device(args.device)
    layers, heads, dim = SHAPES[args.model_shape]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cuda = device.type == "cuda"
    geo = dict(num_layers=layers, page_size=args.page_size, num_kv_heads=heads, head_dim=dim,
               dtype=dtype)
    pool = KVPool(num_pages=args.pool_pages, device=device, **geo)  # type: ignore[arg-type]
    host = HostKVPool(num_pages=args.pool_pages, pin=cuda, **geo)  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    n = args.pages
    nbytes = n * host.page_bytes
    rows: list[dict[str, Any]] = []

    def emit(kind: str, secs: float, moved: int = nbytes, **extra: Any) -> None:
        row = {"kind": kind, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
               "pages": n, "page_bytes": host.page_bytes, "bytes": moved,
               "ms": round(secs * 1e3, 3), "GB/s": round(moved / secs / 1e9, 2), **extra}
        rows.append(row)
        print(json.dumps(row), flush=True)

    # 1. The limit: one contiguous pinned <-> device copy of the same size.
    flat_host = host.data[1 : n + 1]
    flat_dev = torch.empty_like(flat_host, device=device)
    h2d = timed(lambda: flat_dev.copy_(flat_host, non_blocking=True), device, args.iters)
    d2h = timed(lambda: flat_host.copy_(flat_dev, non_blocking=True), device, args.iters)
    emit("contiguous_h2d", h2d)
    emit("contiguous_d2h", d2h)
    flat_dev = torch.empty(0)

    # 2. The tier's path on scattered pages (random ids in both pools).
    gpu_pages = (rng.permutation(args.pool_pages)[:n] + 1).astype(np.int32)
    host_pages = (rng.permutation(args.pool_pages)[:n] + 1).astype(np.int32)
    seq_host = np.arange(1, n + 1, dtype=np.int32)  # consecutive host pages: one DMA
    for staging in args.staging_pages:
        xfer = PageTransfer(pool, host, staging_pages=staging)

        def load(x: PageTransfer = xfer) -> None:
            x.load(host_pages, gpu_pages)
            x.synchronize()

        def write(x: PageTransfer = xfer) -> None:
            x.write(gpu_pages, host_pages)
            x.synchronize()

        emit("tier_load", t := timed(load, device, args.iters), staging_pages=staging,
             fraction=round(h2d / t, 3))
        emit("tier_write", t := timed(write, device, args.iters), staging_pages=staging,
             fraction=round(d2h / t, 3))
        # A fresh host allocator hands out consecutive pages: the best case, one DMA per chunk.
        def load_runs(x: PageTransfer = xfer) -> None:
            x.load(seq_host, gpu_pages)
            x.synchronize()

        emit("tier_load_host_runs", t := timed(load_runs, device, args.iters),
             staging_pages=staging, fraction=round(h2d / t, 3))
        del xfer

    # 3. Naive torch indexing between the pools (layer-major host view, synchronous).
    k, _ = pool.all_layers()
    gi = torch.from_numpy(gpu_pages.astype(np.int64)).to(device)
    hi = torch.from_numpy(host_pages.astype(np.int64))
    hk = host.data[:, 0].transpose(0, 1)  # [L, P+1, ps, H, D] view of the page-major host pool

    def naive_write() -> None:
        hk[:, hi] = k[:, gi].cpu()

    def naive_load() -> None:
        k[:, gi] = hk[:, hi].to(device)

    emit("naive_write", t := timed(naive_write, device, 2), moved=nbytes // 2,
         fraction=round(d2h / t / 2, 3), note="K only")
    emit("naive_load", t := timed(naive_load, device, 2), moved=nbytes // 2,
         fraction=round(h2d / t / 2, 3), note="K only")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    host.close()


if __name__ == "__main__":
    main()
