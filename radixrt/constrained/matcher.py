"""One sequence's grammar state: which tokens may come next, advanced token by token.

A thin wrapper over ``xgrammar.GrammarMatcher`` that the engine owns per sequence. It keeps
enough history to roll back the tokens of a retracted or re-planned step, and can be forked for
the samples of an n > 1 request (each sample then walks the grammar on its own).

``num_accepted`` counts the tokens that are part of the sequence's output: an accepted stop
token ends the grammar (``terminated``) but is not counted, as it is never appended to the
output. ``failed`` and ``terminated`` are tracked here in Python, so the hot path reads them
without a call into xgrammar (each such call drops and retakes the GIL).

``history`` is every token xgrammar accepted (the stop token included). A ``lazy`` matcher
(the grammar-process path, ``proc_masks``) does not call xgrammar when a step's token is
counted (``_record``): the token waits in ``history`` past ``_raw_len`` and the xgrammar
matcher catches up only when something here needs it (``raw``: a fork, a jump-forward, an
in-process fill); the grammar process keeps its own copy in step from ``history``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import xgrammar as xgr

_IDS = itertools.count(1)


class Matcher:
    def __init__(self, compiled: xgr.CompiledGrammar,
                 _matcher: xgr.GrammarMatcher | None = None, *, shard: int = 0,
                 lazy: bool = False) -> None:
        self.compiled = compiled
        # xgrammar keeps the whole history, so any accepted token can be rolled back.
        self._m = _matcher if _matcher is not None else xgr.GrammarMatcher(compiled)
        self.stop_token_ids = frozenset(int(t) for t in self._m.stop_token_ids)
        self.num_accepted = 0
        self.failed = False  # a token outside the grammar was offered (never under the mask)
        self.terminated = False  # a stop token was accepted: nothing may follow
        self.shard = shard  # which fill thread advances it (the fused path keeps it there)
        self.id = next(_IDS)  # names its copy in the grammar process
        self.lazy = lazy
        self.history: list[int] = []
        self._raw_len = 0  # lazy: how much of ``history`` the xgrammar matcher has accepted
        # Lazy: the shortest ``history`` has been since the grammar process last synced this
        # matcher (its copy there is in step up to here); the client resets it on each sync.
        self.low = 0

    @property
    def raw(self) -> xgr.GrammarMatcher:
        """The xgrammar matcher, in step with ``history`` (a lazy one catches up here)."""
        if self.lazy and self._raw_len < len(self.history):
            flush([self])
        return self._m

    @property
    def done(self) -> bool:
        """Nothing can follow (failed or terminated): its mask row allows everything and the
        next token offered is refused."""
        return self.failed or self.terminated

    def _record(self, token: int, ok: bool) -> bool:
        if not ok:
            self.failed = True
            return ok
        self.history.append(token)
        if token in self.stop_token_ids:
            self.terminated = True
        else:
            self.num_accepted += 1
        return ok

    def advance(self, token: int) -> bool:
        """Accept ``token``; False (and ``failed``) if the grammar does not allow it."""
        if self.done:
            self.failed = True
            return False
        ok = self._record(int(token), bool(self.raw.accept_token(int(token))))
        if ok:
            self._raw_len = len(self.history)
        return ok

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

            flush([matchers[i] for i in live])
            res = batch_accept([matchers[i]._m for i in live], toks) or [True] * len(live)
            for i, t, ok in zip(live, toks, res):
                m = matchers[i]
                oks[i] = m._record(t, bool(ok))
                m._raw_len = len(m.history)
        return oks

    def rollback(self, n: int) -> None:
        """Undo the last ``n`` output tokens (and an accepted stop token after them)."""
        assert 0 <= n <= self.num_accepted, f"cannot roll back {n} of {self.num_accepted} tokens"
        if n:
            keep = len(self.history) - n - self.terminated
            if not self.lazy:
                self._m.rollback(n + self.terminated)
            elif self._raw_len > keep:  # pending tokens are just dropped
                self._m.rollback(self._raw_len - keep)
                self._raw_len = keep
            del self.history[keep:]
            self.low = min(self.low, keep)
            self.num_accepted -= n
            self.failed = self.terminated = False

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into ``bitmask[row]`` (a CPU int32 tensor)."""
        self.raw.fill_next_token_bitmask(bitmask, row)

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete and its stop token was accepted: nothing more may follow."""
        return bool(self.raw.is_terminated())

    @property
    def is_completed(self) -> bool:
        """The text so far is a complete match (a stop token may come next)."""
        return bool(self.raw.is_completed())

    def jump_forward(self) -> str:
        """The text the grammar forces next (may be empty)."""
        return str(self.raw.find_jump_forward_string())

    def fork(self, shard: int | None = None) -> Matcher:
        """An independent copy at the same position (for a sample of an n > 1 request); a
        lazy copy shares the pending tokens, not yet accepted by either xgrammar matcher."""
        m = Matcher(self.compiled, self._m.fork(), shard=self.shard if shard is None else shard,
                    lazy=self.lazy)
        m.num_accepted, m.failed, m.terminated = self.num_accepted, self.failed, self.terminated
        m.history, m._raw_len = list(self.history), self._raw_len
        return m


def flush(matchers: Sequence[Matcher]) -> None:
    """Bring lazy matchers' xgrammar state up to their ``history``: one batch accept per
    pending position (on the hot path of the in-process fallback, one call for the batch). A
    refusal (never: the tokens were counted under the mask) fails the matcher there."""
    from radixrt.constrained.batch import batch_accept

    todo = [m for m in matchers if m.lazy and m._raw_len < len(m.history)]
    while todo:
        res = batch_accept([m._m for m in todo], [m.history[m._raw_len] for m in todo])
        for j, m in enumerate(todo):
            if res is None or res[j]:
                m._raw_len += 1
            else:
                del m.history[m._raw_len:]
                m.failed = True
        todo = [m for m in todo if m._raw_len < len(m.history)]
