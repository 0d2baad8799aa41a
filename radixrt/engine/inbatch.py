"""In-batch prefix sharing: requests admitted in one step don't see each other in the radix tree
(their KV isn't computed yet), so two requests with the same new stem admitted together would
both compute it. The scheduler defers a request whose uncached stem starts like one already
admitted this step; next step it hits the tree instead.

Prefixes are compared by chained page hashes: h_k = hash((h_{k-1}, page_k tokens)), so one pass
over each admitted prompt records all its page-aligned prefixes.
"""

from __future__ import annotations

import numpy as np

# A deferred request must share at least this many uncached tokens with an admitted one.
MIN_SHARED_TOKENS = 32


class InBatchPrefixes:
    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self._hashes: set[int] = set()
        self._need_pages = max(1, -(-MIN_SHARED_TOKENS // page_size))

    def _chain(self, tokens: np.ndarray, num_pages: int) -> list[int]:
        ps, h, out = self.page_size, 0, []
        for k in range(num_pages):
            h = hash((h, tokens[k * ps : (k + 1) * ps].tobytes()))
            out.append(h)
        return out

    def shares_stem(self, tokens: np.ndarray, cached_len: int) -> bool:
        """True if ``tokens`` extends its cached part by a stem an admitted request is computing."""
        target = cached_len // self.page_size + self._need_pages
        if not self._hashes or target * self.page_size > len(tokens):
            return False
        return self._chain(tokens, target)[-1] in self._hashes

    def add(self, tokens: np.ndarray) -> None:
        self._hashes.update(self._chain(tokens, len(tokens) // self.page_size))
