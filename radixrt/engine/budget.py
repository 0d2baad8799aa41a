"""The prefill token budget of one scheduler step."""

from __future__ import annotations


class PrefillBudget:
    """Caps prompt tokens computed per step (all requests) and per request (chunking).

    Chunks are cut on page boundaries where possible so each finished chunk inserts whole pages
    into the prefix cache.
    """

    def __init__(self, max_tokens: int, chunk_size: int, page_size: int) -> None:
        assert chunk_size >= page_size, f"chunk {chunk_size} smaller than a page {page_size}"
        self.remaining = max_tokens
        self.chunk_size = chunk_size
        self.page_size = page_size

    @property
    def exhausted(self) -> bool:
        return self.remaining <= 0

    def peek(self, want: int, already_computed: int) -> int:
        """Tokens a request that still needs ``want`` may compute now (0 = none)."""
        n = min(want, self.chunk_size, self.remaining)
        if n < want:
            # Stop the chunk on a page boundary (absolute position), unless that leaves nothing.
            end = already_computed + n
            aligned = end - end % self.page_size
            if aligned > already_computed:
                n = aligned - already_computed
        return max(n, 0)

    def take(self, n: int) -> None:
        assert 0 < n <= self.remaining, f"taking {n} of {self.remaining} budget tokens"
        self.remaining -= n
