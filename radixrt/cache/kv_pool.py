"""The physical KV memory: per layer, one K and one V tensor divided into fixed-size pages.

    k[layer]: [num_pages + 1, page_size, num_kv_heads, head_dim]
               ^ page 0 is scratch: never allocated; padded batch entries read/write it

A flat slot index ``page * page_size + offset`` addresses one token's K (or V) row in
``k_flat(layer)``: [(num_pages + 1) * page_size, num_kv_heads, head_dim]. Which pages belong to
whom is the PageAllocator's business; this class only holds the tensors.
"""

from __future__ import annotations

import torch


class KVPool:
    def __init__(
        self,
        *,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        assert num_pages >= 1 and page_size >= 1, f"bad pool shape {num_pages=} {page_size=}"
        self.num_layers = num_layers
        self.num_pages = num_pages
        self.page_size = page_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (num_layers, num_pages + 1, page_size, num_kv_heads, head_dim)
        # One allocation each for K and V keeps the pool contiguous and cheap to size-check.
        self._k = torch.zeros(shape, dtype=dtype, device=self.device)
        self._v = torch.zeros(shape, dtype=dtype, device=self.device)

    @staticmethod
    def bytes_per_page(
        *, num_layers: int, page_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * page_size * num_kv_heads * head_dim * elem

    def k(self, layer: int) -> torch.Tensor:  # [P+1, page_size, Hkv, D]
        return self._k[layer]

    def v(self, layer: int) -> torch.Tensor:  # [P+1, page_size, Hkv, D]
        return self._v[layer]

    def all_layers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of every layer, [L, P+1, page_size, Hkv, D] each (host-tier page copies)."""
        return self._k, self._v

    def k_flat(self, layer: int) -> torch.Tensor:  # [(P+1)*page_size, Hkv, D]
        return self._k[layer].view(-1, self.num_kv_heads, self.head_dim)

    def v_flat(self, layer: int) -> torch.Tensor:  # [(P+1)*page_size, Hkv, D]
        return self._v[layer].view(-1, self.num_kv_heads, self.head_dim)

    def store(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write new tokens' K/V ([T, Hkv, D]) at flat ``slots`` ([T] int64)."""
        self.k_flat(layer).index_copy_(0, slots, k.to(self.dtype))
        self.v_flat(layer).index_copy_(0, slots, v.to(self.dtype))

    def copy_pages(self, src: list[int], dst: list[int]) -> None:
        """Copy whole pages across all layers (a forked sequence's partly filled last page)."""
        assert len(src) == len(dst), "copy_pages needs equal-length page lists"
        if not src:
            return
        idx = torch.tensor([src, dst], dtype=torch.int64)
        if self.device.type == "cuda":  # pinned + non_blocking: no wait for the queued step
            idx = idx.pin_memory().to(self.device, non_blocking=True)
        s, d = idx[0], idx[1]
        self._k[:, d] = self._k[:, s]
        self._v[:, d] = self._v[:, s]

    @property
    def total_bytes(self) -> int:
        return 2 * self._k.numel() * self._k.element_size()
