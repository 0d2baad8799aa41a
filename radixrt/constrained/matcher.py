"""One sequence's grammar state: which tokens may come next, advanced token by token.

A thin wrapper over ``xgrammar.GrammarMatcher`` that the engine owns per sequence. It keeps
enough history to roll back the tokens of a retracted or re-planned step, and can be forked for
the samples of an n > 1 request (each sample then walks the grammar on its own).
"""

from __future__ import annotations

import torch
import xgrammar as xgr


class Matcher:
    def __init__(self, compiled: xgr.CompiledGrammar,
                 _matcher: xgr.GrammarMatcher | None = None) -> None:
        self.compiled = compiled
        # xgrammar keeps the whole history, so any accepted token can be rolled back.
        self._m = _matcher if _matcher is not None else xgr.GrammarMatcher(compiled)
        self.num_accepted = 0
        self.failed = False  # a token outside the grammar was appended (never under the mask)

    @property
    def raw(self) -> xgr.GrammarMatcher:
        return self._m

    def advance(self, token: int) -> bool:
        """Accept ``token``; False (and ``failed``) if the grammar does not allow it."""
        if self.failed or self._m.is_terminated():
            self.failed = True
            return False
        ok = bool(self._m.accept_token(int(token)))
        if ok:
            self.num_accepted += 1
        else:
            self.failed = True
        return ok

    @staticmethod
    def advance_batch(matchers: list[Matcher], tokens: list[int]) -> list[bool]:
        """``advance`` for many matchers (none may be failed or terminated: the caller checks).

        One ``accept_token`` call per row, not xgrammar's ``batch_accept_token``: on the H200
        box (16 cores) the batch call took 11.1 ms for 256 rows against 1.2-1.3 ms for the
        per-row calls (bench/RESULTS.md, constrained decode), and the rows are independent."""
        oks = [bool(m._m.accept_token(int(t))) for m, t in zip(matchers, tokens)]
        for m, ok in zip(matchers, oks):
            if ok:
                m.num_accepted += 1
            else:
                m.failed = True
        return oks

    def rollback(self, n: int) -> None:
        assert 0 <= n <= self.num_accepted, f"cannot roll back {n} of {self.num_accepted} tokens"
        if n:
            self._m.rollback(n)
            self.num_accepted -= n
            self.failed = False

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into ``bitmask[row]`` (a CPU int32 tensor)."""
        self._m.fill_next_token_bitmask(bitmask, row)

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete and its stop token was accepted: nothing more may follow."""
        return bool(self._m.is_terminated())

    @property
    def is_completed(self) -> bool:
        """The text so far is a complete match (a stop token may come next)."""
        return bool(self._m.is_completed())

    def jump_forward(self) -> str:
        """The text the grammar forces next (may be empty)."""
        return str(self._m.find_jump_forward_string())

    def fork(self) -> Matcher:
        """An independent copy at the same position (for a sample of an n > 1 request)."""
        m = Matcher(self.compiled, self._m.fork())
        m.num_accepted, m.failed = self.num_accepted, self.failed
        return m
