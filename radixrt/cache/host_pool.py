"""The host KV pool: the tier below the GPU pool, in pinned RAM on CUDA (plain RAM on CPU).

Same page geometry as ``KVPool`` but page-major, so one host page (every layer's K and V of
``page_size`` tokens) is one contiguous block and a run of consecutive host pages is one DMA::

    data: [num_pages + 1, 2 (K, V), num_layers, page_size, num_kv_heads, head_dim]
           ^ page 0 is scratch, never allocated (ids match the GPU pool's convention)

Which host pages belong to whom is its ``PageAllocator``'s business: the tree is the only
holder (one reference per host page). This class holds the memory and pins it.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from radixrt.cache.allocator import PageAllocator

logger = logging.getLogger(__name__)


class HostKVPool:
    def __init__(
        self, *, num_pages: int, num_layers: int, page_size: int, num_kv_heads: int,
        head_dim: int, dtype: torch.dtype, pin: bool,
    ) -> None:  # fmt: skip
        assert num_pages >= 1 and page_size >= 1, f"bad host pool shape {num_pages=} {page_size=}"
        self.num_pages = num_pages
        self.page_size = page_size
        self.num_layers = num_layers
        self.dtype = dtype
        self.allocator = PageAllocator(num_pages)
        shape = (num_pages + 1, 2, num_layers, page_size, num_kv_heads, head_dim)
        # torch's pinned allocator rounds every block up to a power of two (100 GB would ask for
        # 128), so pin a plain allocation ourselves with cudaHostRegister.
        self.data = torch.empty(shape, dtype=dtype)
        self._registered = False
        if pin:
            err = torch.cuda.cudart().cudaHostRegister(self.data.data_ptr(), self.total_bytes, 0)
            if int(err) != 0:
                raise RuntimeError(
                    f"cudaHostRegister of {self.total_bytes / 2**30:.1f} GiB for the host KV tier "
                    f"failed (error {int(err)}): lower host_kv_cache_tokens"
                )
            self._registered = True
        logger.info("host KV tier: %d pages (%.2f GiB%s)", num_pages, self.total_bytes / 2**30,
                    ", pinned" if pin else "")

    @staticmethod
    def bytes_per_page(
        *, num_layers: int, page_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * page_size * num_kv_heads * head_dim * elem

    @property
    def page_bytes(self) -> int:
        return self.data[0].numel() * self.data.element_size()

    @property
    def total_bytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    @property
    def pinned(self) -> bool:
        return self._registered

    def close(self) -> None:
        """Unpin (idempotent); the memory goes with the tensor."""
        if self._registered:
            torch.cuda.cudart().cudaHostUnregister(self.data.data_ptr())
            self._registered = False

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: CUDA may be gone already
            self.close()
