"""SGLang frontend calls beyond gen / select: ``separate_reasoning`` (split a reasoning model's
``<think>...</think>`` out of a generated variable) and the vision calls, which radixrt
rejects by name (it serves text-only models)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from radixrt.lang.exprs import Expr, ExprList

if TYPE_CHECKING:
    from radixrt.lang.state import ProgramState

# Reasoning markers by SGLang reasoning-parser name: (start, end, forced). "forced": the chat
# template opens the reasoning block in the prompt, so output before the end marker is
# reasoning even without a start marker.
_THINK = ("<think>", "</think>")
REASONING_MARKERS: dict[str, tuple[str, str, bool]] = {
    "deepseek-r1": (*_THINK, True),
    "qwen3-thinking": (*_THINK, True),
    "deepseek-v3": (*_THINK, False),
    "qwen3": (*_THINK, False),
    "glm45": (*_THINK, False),
    "mimo": (*_THINK, False),
    "step3": (*_THINK, True),
    "kimi": ("\u25c1think\u25b7", "\u25c1/think\u25b7", False),
}


def split_reasoning(text: str, model_type: str) -> tuple[str, str]:
    """``(reasoning, answer)`` of a reasoning model's output."""
    start, end, forced = REASONING_MARKERS[model_type]
    body = text.lstrip()
    opened = body.startswith(start)
    if opened:
        body = body[len(start):]
    elif not forced:
        return "", text
    if end not in body:
        return body.strip(), ""  # still reasoning when generation stopped
    reasoning, answer = body.split(end, 1)
    return reasoning.strip(), answer.lstrip()


def _names(expr: Any) -> list[str]:
    from radixrt.lang.ops import Gen, Select

    if isinstance(expr, (Gen, Select)):
        if not expr.name:
            raise ValueError("separate_reasoning needs a named gen or select")
        return [expr.name]
    if isinstance(expr, ExprList):
        return [n for x in expr.items for n in _names(x)]
    return []


@dataclass(frozen=True, eq=False)
class SeparateReasoning(Expr):
    """Run ``expr``; then each named gen in it keeps only the answer, and its reasoning goes
    to ``<name>_reasoning_content``. The state's text keeps the answer only."""

    expr: Expr
    model_type: str | None

    def describe(self) -> str:
        return f"separate_reasoning({self.expr.describe()})"

    def apply(self, s: ProgramState) -> None:
        model_type = self.model_type or s.backend_reasoning_parser()
        if model_type is None:
            raise ValueError("separate_reasoning needs model_type= (the server names no "
                             "reasoning parser)")
        _check_model_type(model_type)
        if s.streaming:
            raise ValueError("separate_reasoning is not supported on streamed programs")
        names = _names(self.expr)
        before = len(s.text())
        s += self.expr
        text = s.text()
        for name in names:
            value = s[name]
            if not isinstance(value, str):
                raise ValueError(f"separate_reasoning: {name!r} has {len(value)} samples (n > 1)")
            reasoning, answer = split_reasoning(value, model_type)
            at = text.rfind(value, before)
            if at >= 0:  # the state keeps the answer in place of the whole output
                text = text[:at] + answer + text[at + len(value):]
            s.set_var(name, answer)
            s.set_var(f"{name}_reasoning_content", reasoning)
        s._replace_text(text)


def separate_reasoning(expr: Expr | None = None, model_type: str | None = None) -> Expr:
    if expr is None:
        raise ValueError("separate_reasoning needs an expression (a named gen)")
    _names(expr)  # fail at the call site on an unnamed gen
    if model_type is not None:
        _check_model_type(model_type)
    return SeparateReasoning(expr, model_type)


def _check_model_type(model_type: str) -> None:
    if model_type not in REASONING_MARKERS:
        raise ValueError(f"separate_reasoning: model_type {model_type!r} is not supported "
                         f"(supported: {sorted(REASONING_MARKERS)})")


def image(path: Any) -> Expr:
    raise NotImplementedError("image() is not supported: radixrt serves text-only models "
                              "(no vision)")


def video(path: Any, num_frames: int = 0) -> Expr:
    raise NotImplementedError("video() is not supported: radixrt serves text-only models "
                              "(no vision)")


def Runtime(*args: Any, **kwargs: Any) -> Any:  # noqa: N802  (SGLang's name)
    raise NotImplementedError("sgl.Runtime (launching a server from the program) is not "
                              "supported: start `radixrt serve` and use RuntimeEndpoint(url), "
                              "or run in process with EngineBackend(model=...)")


def Engine(*args: Any, **kwargs: Any) -> Any:  # noqa: N802  (SGLang's name)
    raise NotImplementedError("sgl.Engine is not part of radixrt.lang: use "
                              "radixrt.lang.EngineBackend(model=...) (or radixrt.Engine)")
