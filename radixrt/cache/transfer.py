"""Page copies between the GPU KV pool and the host tier, off the compute stream.

Every copy is one *ticket* on a single side stream, so tickets finish in order and a host page
may be reused by a later copy without waiting (the stream orders them). A copy first waits for
the work already queued on the compute stream (the KV it reads, or the last reads of the GPU
pages it overwrites), then, per chunk of at most ``staging_pages`` pages::

    write (GPU -> host):  pool[:, pages] --gather--> staging [n, 2, L, ps, H, D] --DMA per run
                          of consecutive host pages--> host.data[h0 : h0 + run]
    load  (host -> GPU):  host.data[h0 : h0 + run] --DMA--> staging --scatter--> pool[:, pages]

The gather/scatter run on the device (HBM bandwidth, far above PCIe), so the PCIe part is a few
large contiguous copies. The host never waits: ``done(ticket)`` polls events; ``fence(ticket)``
makes the *compute* stream wait on the device (for a GPU page that is about to be reused while
its write-back is still in flight). On CPU every copy completes before the call returns, unless
``sim_gbps`` is set (env ``RADIXRT_SIM_TRANSFER_GBPS`` for benches): the data is copied at once
but a ticket reports done only when a copy engine of that bandwidth, serving tickets in order,
would have finished it, so CPU runs see loads pending across steps as on a GPU.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from radixrt.cache.host_pool import HostKVPool
from radixrt.cache.kv_pool import KVPool
from radixrt.cache.node import IntArray


@dataclass
class _Pending:
    ticket: int
    done: torch.cuda.Event
    start: torch.cuda.Event
    is_load: bool


@dataclass
class TransferStats:
    bytes_loaded: int = 0
    bytes_written: int = 0
    loads: int = 0
    writes: int = 0
    load_seconds: float = 0.0  # device time of finished loads (wall time on CPU)
    write_seconds: float = 0.0


def page_runs(pages: IntArray) -> list[tuple[int, int, int]]:
    """(first page, index in ``pages``, length) of each run of consecutive page ids."""
    if len(pages) == 0:
        return []
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(pages)]))
    return [(int(pages[s]), int(s), int(e - s)) for s, e in zip(starts, ends, strict=True)]


class PageTransfer:
    def __init__(self, pool: KVPool, host: HostKVPool, *, staging_pages: int = 64,
                 sim_gbps: float = 0.0) -> None:
        assert pool.page_size == host.page_size and pool.num_layers == host.num_layers, (
            "host tier and GPU pool must share the page geometry"
        )
        assert pool.dtype == host.dtype, f"dtype mismatch: {pool.dtype} vs {host.dtype}"
        self.pool = pool
        self.host = host
        self.device = pool.device
        self._cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._chunk = staging_pages
        self._staging = torch.empty(
            (staging_pages, *host.data.shape[1:]), dtype=host.dtype, device=self.device
        )  # [chunk, 2, L, ps, H, D]
        self._next = 1
        self._completed = 0  # every ticket <= this has finished
        self._pending: deque[_Pending] = deque()
        self.stats = TransferStats()
        assert sim_gbps >= 0 and (sim_gbps == 0 or not self._cuda), "sim_gbps is for CPU only"
        self._sim_bps = sim_gbps * 1e9
        self._sim: deque[tuple[int, float]] = deque()  # (ticket, done at), in ticket order

    # ------------------------------------------------------------------ copies
    def write(self, gpu_pages: IntArray, host_pages: IntArray) -> int:
        """Copy GPU pages to host pages; returns the ticket."""
        n = len(gpu_pages)
        assert n == len(host_pages) and n > 0, f"write of {n} pages to {len(host_pages)}"
        self.stats.writes += 1
        self.stats.bytes_written += n * self.host.page_bytes
        return self._run(gpu_pages, host_pages, is_load=False)

    def load(self, host_pages: IntArray, gpu_pages: IntArray) -> int:
        """Copy host pages into (freshly allocated) GPU pages; returns the ticket."""
        n = len(gpu_pages)
        assert n == len(host_pages) and n > 0, f"load of {len(host_pages)} pages into {n}"
        self.stats.loads += 1
        self.stats.bytes_loaded += n * self.host.page_bytes
        return self._run(gpu_pages, host_pages, is_load=True)

    def _run(self, gpu_pages: IntArray, host_pages: IntArray, *, is_load: bool) -> int:
        ticket = self._next
        self._next += 1
        if self._stream is None:
            t0 = time.perf_counter()
            self._copy(gpu_pages, host_pages, is_load)
            secs = time.perf_counter() - t0
            if self._sim_bps:
                secs = len(gpu_pages) * self.host.page_bytes / self._sim_bps
                start_at = max(t0, self._sim[-1][1]) if self._sim else t0
                self._sim.append((ticket, start_at + secs))
            else:
                self._completed = ticket
            if is_load:
                self.stats.load_seconds += secs
            else:
                self.stats.write_seconds += secs
            return ticket
        start, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            start.record(self._stream)
            self._copy(gpu_pages, host_pages, is_load)
            done.record(self._stream)
        self._pending.append(_Pending(ticket, done, start, is_load))
        return ticket

    def _copy(self, gpu_pages: IntArray, host_pages: IntArray, is_load: bool) -> None:
        k, v = self.pool.all_layers()  # [L, P+1, ps, H, D] each
        hdata = self.host.data
        for c in range(0, len(gpu_pages), self._chunk):
            gp = gpu_pages[c : c + self._chunk]
            hp = np.asarray(host_pages[c : c + self._chunk])
            n = len(gp)
            stage = self._staging[:n]
            idx = self._device_index(gp)
            runs = page_runs(hp)
            if is_load:
                for h0, i0, r in runs:
                    stage[i0 : i0 + r].copy_(hdata[h0 : h0 + r], non_blocking=True)
                k.index_copy_(1, idx, stage[:, 0].transpose(0, 1))
                v.index_copy_(1, idx, stage[:, 1].transpose(0, 1))
            else:
                stage[:, 0].copy_(k.index_select(1, idx).transpose(0, 1))
                stage[:, 1].copy_(v.index_select(1, idx).transpose(0, 1))
                for h0, i0, r in runs:
                    hdata[h0 : h0 + r].copy_(stage[i0 : i0 + r], non_blocking=True)

    def _device_index(self, pages: IntArray) -> torch.Tensor:
        host = torch.from_numpy(np.asarray(pages, dtype=np.int64))
        if not self._cuda:
            return host
        # Pinned, so the index upload is asynchronous too (a pageable one would block the host
        # until the side stream drained).
        return host.pin_memory().to(self.device, non_blocking=True)

    # ------------------------------------------------------------------ completion
    def poll(self) -> int:
        """Retire finished tickets (in order); returns the newest ticket known finished."""
        now = time.perf_counter() if self._sim else 0.0
        while self._sim and self._sim[0][1] <= now:
            self._completed = self._sim.popleft()[0]
        while self._pending and self._pending[0].done.query():
            p = self._pending.popleft()
            secs = p.start.elapsed_time(p.done) / 1e3
            if p.is_load:
                self.stats.load_seconds += secs
            else:
                self.stats.write_seconds += secs
            self._completed = p.ticket
        return self._completed

    def done(self, ticket: int) -> bool:
        return ticket <= self._completed or ticket <= self.poll()

    def fence(self, ticket: int) -> bool:
        """Order the compute stream after ``ticket`` (on the device; the host does not wait).
        Returns True if the ticket was still running."""
        if self.done(ticket):
            return False
        if self._sim_bps:
            return True  # simulated: the data was copied already, only "done" is late
        for p in self._pending:
            if p.ticket == ticket:
                torch.cuda.current_stream(self.device).wait_event(p.done)
                return True
        raise AssertionError(f"ticket {ticket} is neither finished nor pending")

    def synchronize(self) -> None:
        """Wait (on the host) for every ticket: shutdown and tests only."""
        if self._stream is not None:
            self._stream.synchronize()
        if self._sim:
            self._completed = self._sim[-1][0]
            self._sim.clear()
        self.poll()

    @property
    def in_flight(self) -> int:
        return len(self._pending) + len(self._sim)


# "auto" sizing of the host tier: this many times the GPU pool, within this share of the RAM
# available at start (pinned memory cannot be swapped out, so leave the rest to the system).
AUTO_GPU_MULTIPLE = 4
AUTO_RAM_SHARE = 0.4


def available_ram_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def host_tier_pages(tokens: int | str, page_size: int, page_bytes: int, gpu_pages: int,
                    device: torch.device) -> int:
    """Host pages for ``host_kv_cache_tokens`` (0 = off, "auto", or tokens); raises ValueError
    when an explicit size would not fit the available RAM."""
    avail = available_ram_bytes()
    if tokens == "auto":
        if device.type != "cuda":
            return 0
        return max(0, min(AUTO_GPU_MULTIPLE * gpu_pages, int(AUTO_RAM_SHARE * avail) // page_bytes))
    assert isinstance(tokens, int), f"host tier size {tokens!r}"
    pages = -(-tokens // page_size)
    if pages and pages * page_bytes > 0.9 * avail:
        raise ValueError(
            f"host_kv_cache_tokens={tokens} needs {pages * page_bytes / 2**30:.1f} GiB of RAM; "
            f"{avail / 2**30:.1f} GiB are available"
        )
    return pages


def make_host_tier(pool: KVPool, tokens: int | str, *, staging_pages: int = 64) -> PageTransfer | None:
    """The host pool and its transfer engine for a GPU pool, or None when the tier is off."""
    page_bytes = HostKVPool.bytes_per_page(
        num_layers=pool.num_layers, page_size=pool.page_size, num_kv_heads=pool.num_kv_heads,
        head_dim=pool.head_dim, dtype=pool.dtype,
    )
    pages = host_tier_pages(tokens, pool.page_size, page_bytes, pool.num_pages, pool.device)
    if pages == 0:
        return None
    host = HostKVPool(
        num_pages=pages, num_layers=pool.num_layers, page_size=pool.page_size,
        num_kv_heads=pool.num_kv_heads, head_dim=pool.head_dim, dtype=pool.dtype,
        pin=pool.device.type == "cuda",
    )
    sim = float(os.environ.get("RADIXRT_SIM_TRANSFER_GBPS", "0") or 0)
    if sim and pool.device.type == "cuda":
        raise ValueError("RADIXRT_SIM_TRANSFER_GBPS simulates copy time on CPU only")
    return PageTransfer(pool, host, staging_pages=min(staging_pages, pages), sim_gbps=sim)
