"""One sequence's grammar state: which tokens may come next, advanced token by token.

A thin wrapper over ``xgrammar.GrammarMatcher`` that the engine owns per sequence. It keeps
enough history to roll back the tokens of a retracted or re-planned step, and can be forked for
the samples of an n > 1 request (each sample then walks the grammar on its own).

``num_accepted`` counts the tokens that are part of the sequence's output: an accepted stop
token ends the grammar (``terminated``) but is not counted, as it is never appended to the
output. ``failed`` and ``terminated`` are tracked here in Python, so the hot path reads them
without a call into xgrammar (each such call drops and retakes the GIL).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import xgrammar as xgr


class Matcher:
    def __init__(self, compiled: xgr.CompiledGrammar,
                 _matcher: xgr.GrammarMatcher | None = None, *, shard: int = 0) -> None:
        self.compiled = compiled
        # xgrammar keeps the whole history, so any accepted token can be rolled back.
        self._m = _matcher if _matcher is not None else xgr.GrammarMatcher(compiled)
        self.stop_token_ids = frozenset(int(t) for t in self._m.stop_token_ids)
        self.num_accepted = 0
        self.failed = False  # a token outside the grammar was offered (never under the mask)
        self.terminated = False  # a stop token was accepted: nothing may follow
        self.shard = shard  # which fill thread advances it (the fused path keeps it there)

    @property
    def raw(self) -> xgr.GrammarMatcher:
        return self._m

    @property
    def done(self) -> bool:
        """Nothing can follow (failed or terminated): its mask row allows everything and the
        next token offered is refused."""
        return self.failed or self.terminated

    def _record(self, token: int, ok: bool) -> bool:
        if not ok:
            self.failed = True
        elif token in self.stop_token_ids:
            self.terminated = True
        else:
            self.num_accepted += 1
        return ok

    def advance(self, token: int) -> bool:
        """Accept ``token``; False (and ``failed``) if the grammar does not allow it."""
        if self.done:
            self.failed = True
            return False
        return self._record(int(token), bool(self._m.accept_token(int(token))))

    @staticmethod
    def advance_batch(matchers: Sequence[Matcher], tokens: Sequence[int]) -> list[bool]:
        """``advance`` for many matchers. Rows already ``done`` are refused without a call; the
        rest go to xgrammar in one call (one GIL release for the batch: on a fill thread, a
        call per row would wait for the GIL once per row while the scheduler runs Python)."""
        oks = [False] * len(matchers)
        live = [i for i, m in enumerate(matchers) if not m.done]
        for m in matchers:
            if m.done:
                m.failed = True
        if live:
            toks = [int(tokens[i]) for i in live]
            from radixrt.constrained.batch import batch_accept

            res = batch_accept([matchers[i]._m for i in live], toks) or [True] * len(live)
            for i, t, ok in zip(live, toks, res):
                oks[i] = matchers[i]._record(t, bool(ok))
        return oks

    def rollback(self, n: int) -> None:
        """Undo the last ``n`` output tokens (and an accepted stop token after them)."""
        assert 0 <= n <= self.num_accepted, f"cannot roll back {n} of {self.num_accepted} tokens"
        if n:
            self._m.rollback(n + self.terminated)
            self.num_accepted -= n
            self.failed = self.terminated = False

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

    def fork(self, shard: int | None = None) -> Matcher:
        """An independent copy at the same position (for a sample of an n > 1 request)."""
        m = Matcher(self.compiled, self._m.fork(), shard=self.shard if shard is None else shard)
        m.num_accepted, m.failed, m.terminated = self.num_accepted, self.failed, self.terminated
        return m
