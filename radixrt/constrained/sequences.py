"""The engine's side of structured generation: one matcher per constrained sequence, kept in
step with the sequence's output, and the step's bitmask from them.

Matchers live here, keyed weakly by sequence, not on the sequence itself: a sequence that
ends (finished, aborted, failed) drops its matcher with it, and nothing in the scheduler's
state transitions (fork, retraction, resume) has to know about grammars. A matcher is made
the first time a sequence is sampled and is re-synchronized with ``output_ids`` before every
mask: a fork of an n > 1 request (empty output) starts from the grammar's start; a sequence
whose output was cut back is rolled back; one that gained tokens elsewhere catches up.

Compilation happens when a request is added (``check``): cached per grammar text, bounded by
``compile_timeout_s``; a bad grammar is a ValueError there, so the request is refused before
anything is allocated.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from radixrt.sampling_params import SamplingParams

if TYPE_CHECKING:
    # xgrammar is imported on the first grammar, not with the engine: a deployment without it
    # still serves everything else, and refuses grammars with a message.
    from radixrt.constrained.batch import MaskBuilder
    from radixrt.constrained.grammar import GrammarCompiler
    from radixrt.constrained.matcher import Matcher
    from radixrt.engine.request import Sequence as Seq

DEFAULT_COMPILE_TIMEOUT_S = 10.0


class SequenceGrammars:
    def __init__(self, tokenizer: Any, vocab_size: int, device: torch.device | str,
                 stop_token_ids: Iterable[int], *,
                 compile_timeout_s: float = DEFAULT_COMPILE_TIMEOUT_S) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.stop_token_ids = sorted(set(stop_token_ids))
        self.compile_timeout_s = compile_timeout_s
        self._compiler: GrammarCompiler | None = None  # built on the first grammar
        self._masks: MaskBuilder | None = None
        self._matchers: weakref.WeakKeyDictionary[Seq, Matcher] = weakref.WeakKeyDictionary()
        self.rejected_tokens = 0

    @property
    def compiler(self) -> GrammarCompiler:
        if self._compiler is None:
            assert self.tokenizer is not None, "check() refuses grammars without a tokenizer"
            from radixrt.constrained.grammar import GrammarCompiler, tokenizer_info

            # The grammar ends on the engine's stop tokens, not only the tokenizer's eos.
            info = tokenizer_info(self.tokenizer, self.vocab_size, self.stop_token_ids)
            self._compiler = GrammarCompiler(info, timeout_s=self.compile_timeout_s)
        return self._compiler

    def check(self, params: SamplingParams) -> None:
        """Compile the request's grammar now (cached); ValueError if it cannot be served."""
        if params.constraint is None:
            return
        kind, _ = params.constraint
        if self.tokenizer is None:
            raise ValueError(f"{kind} needs a tokenizer, and this model has none")
        try:
            import xgrammar  # noqa: F401
        except ImportError:
            raise ValueError(f"{kind} needs the xgrammar package, which is not installed") from None
        from radixrt.constrained.grammar import GrammarError

        try:
            self.compiler.compile(params.constraint)
        except GrammarError as e:
            raise ValueError(str(e)) from None

    @staticmethod
    def needs_masks(seqs: Sequence[Seq]) -> bool:
        return any(s.params.constraint is not None for s in seqs)

    def matcher(self, seq: Seq) -> Matcher | None:
        """The sequence's matcher, in step with its output; None if it is unconstrained."""
        key = seq.params.constraint
        if key is None:
            return None
        m = self._matchers.get(seq)
        if m is None:
            from radixrt.constrained.matcher import Matcher

            m = Matcher(self.compiler.compile(key))
            self._matchers[seq] = m
        out = seq.output_ids
        if m.num_accepted > len(out):
            m.rollback(m.num_accepted - len(out))  # output cut back (e.g. a retraction)
        for t in out[m.num_accepted:]:  # tokens appended without us (none, in the engine)
            m.advance(t)
        return m

    def bitmask(self, seqs: Sequence[Seq], live: Sequence[bool]) -> torch.Tensor | None:
        """[B, W] int32 on the device for a draw over ``seqs``; rows not ``live`` (ended while
        the step ran: their token is dropped) and unconstrained rows allow everything."""
        rows: list[Matcher | None] = []
        for seq, ok in zip(seqs, live):
            m = self.matcher(seq) if ok else None
            rows.append(None if m is None or m.failed or m.is_terminated else m)
        if self._masks is None:
            from radixrt.constrained.batch import MaskBuilder

            self._masks = MaskBuilder(self.vocab_size, self.device)
        return self._masks.fill(rows)

    def accept(self, seq: Seq, token: int) -> bool:
        """Advance the sequence's grammar by its newly sampled ``token``; False if the grammar
        does not allow it (never under the mask: the caller ends the sequence)."""
        m = self.matcher(seq)
        if m is None:
            return True
        ok = m.advance(token)
        if not ok:
            self.rejected_tokens += 1
        else:
            # A stop token is accepted but never appended to the output: keep the count in
            # step with output_ids so the next sync does not roll it back.
            m.num_accepted -= token in self.stop_token_ids
        return ok
