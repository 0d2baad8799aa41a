"""In-batch prefix sharing: requests admitted in one step don't see each other in the radix tree
(their KV isn't computed yet), so two requests with the same new stem admitted together would
both compute it. The scheduler defers a request whose uncached stem starts like one already
admitted this step; next step it hits the tree instead.

Prefixes are compared by chained page hashes: h_k = hash((h_{k-1}, page_k tokens)), so one pass
over each admitted prompt records all its page-aligned prefixes. The chain starts from the
request's namespace (its cache_salt), as the radix tree keeps one root per namespace: a tenant is
never deferred for another tenant's stem, which it could not hit anyway.
"""

from __future__ import annotations

from radixrt.engine.request import Sequence

# A deferred request must share at least this many uncached tokens with an admitted one.
MIN_SHARED_TOKENS = 32


class InBatchPrefixes:
    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self._hashes: set[int] = set()
        self._need_pages = max(1, -(-MIN_SHARED_TOKENS // page_size))

    def _chain(self, seq: Sequence, num_pages: int) -> list[int]:
        """The first ``num_pages`` chained hashes of ``seq``'s tokens. Cached on the sequence:
        its tokens are only ever appended, so a full page's hash never changes."""
        chain = seq.page_hashes
        if len(chain) < num_pages:
            ps, tokens = self.page_size, seq.token_array()
            h = chain[-1] if chain else hash(("namespace", seq.namespace))
            for k in range(len(chain), num_pages):
                h = hash((h, tokens[k * ps : (k + 1) * ps].tobytes()))
                chain.append(h)
        return chain

    def shares_stem(self, seq: Sequence, cached_len: int) -> bool:
        """True if ``seq`` extends its cached part by a stem an admitted request is computing."""
        target = cached_len // self.page_size + self._need_pages
        if not self._hashes or target * self.page_size > seq.num_tokens:
            return False
        return self._chain(seq, target)[target - 1] in self._hashes

    def add(self, seq: Sequence) -> None:
        self._hashes.update(self._chain(seq, seq.num_tokens // self.page_size))
