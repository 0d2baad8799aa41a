"""In-batch prefix sharing: requests admitted in one step don't see each other in the radix tree
(their KV isn't computed yet), so two requests with the same new stem admitted together would
both compute it. The scheduler defers a request whose uncached stem starts like one already
admitted this step; next step it hits the tree instead.

A stem is keyed by where it starts and what it starts with: (the radix node its cached prefix
ends at, its namespace, its next ``MIN_SHARED_TOKENS`` tokens, rounded up to whole pages). Two
requests sharing a stem matched the same cached prefix, so they reached the same node (a node
lives in one namespace's tree); the namespace is part of the key as well, so a tenant is never
deferred for another tenant's stem, which it could not hit anyway. One key per request: O(1)
per admission, whatever the prompt's length.
"""

from __future__ import annotations

from radixrt.engine.request import Sequence

# A deferred request must share at least this many uncached tokens with an admitted one.
MIN_SHARED_TOKENS = 32

StemKey = tuple[object, str | None, bytes]


class InBatchPrefixes:
    def __init__(self, page_size: int) -> None:
        self._span = max(1, -(-MIN_SHARED_TOKENS // page_size)) * page_size
        self._stems: set[StemKey] = set()

    def _stem(self, seq: Sequence) -> StemKey | None:
        """The stem after ``seq``'s attached prefix (``kv_len`` tokens), if long enough."""
        start = seq.kv_len
        if start + self._span > seq.num_tokens:
            return None
        anchor = seq.cache_handle if start > 0 else None  # nothing cached: the namespace's root
        return anchor, seq.namespace, seq.token_array()[start : start + self._span].tobytes()

    def shares_stem(self, seq: Sequence) -> bool:
        """True if ``seq`` extends its cached part by a stem an admitted request is computing."""
        key = self._stem(seq) if self._stems else None
        return key is not None and key in self._stems

    def add(self, seq: Sequence) -> None:
        key = self._stem(seq)
        if key is not None:
            self._stems.add(key)
