"""Role blocks for the DSL, derived from a Hugging Face tokenizer's chat template.

The template is rendered on sentinel messages, and each role's text before and after its
content is read off the differences, so ``system(...) + user(...) + assistant(gen())`` produces
exactly the text ``apply_chat_template(messages, add_generation_prompt=True)`` would, up to the
generated answer (which is what the OpenAI chat endpoint feeds the model).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

ROLES = ("system", "user", "assistant")
_MARK = {r: f"\x1f{r.upper()}-CONTENT\x1f" for r in ROLES}


def _split(text: str, mark: str, what: str) -> tuple[str, str]:
    if text.count(mark) != 1:
        raise ValueError(f"chat template: cannot locate the {what} content in its rendering")
    before, after = text.split(mark)
    return before, after


def _tail(longer: str, shorter: str, what: str) -> str:
    if not longer.startswith(shorter):
        raise ValueError(f"chat template: rendering with the {what} message does not extend "
                         "the rendering without it (roles cannot be appended one by one)")
    return longer[len(shorter):]


@dataclass(frozen=True)
class ChatTemplate:
    """Text around each role's content; ``default_system`` is what the template inserts when
    a conversation starts without a system message (SmolLM2 adds a default system prompt)."""

    prefix: dict[str, str]
    suffix: dict[str, str]
    default_system: str = ""

    def __post_init__(self) -> None:
        for role in ROLES:
            assert role in self.prefix and role in self.suffix, f"missing role {role!r}"

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> ChatTemplate:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the model's tokenizer has no chat template: roles are unavailable")

        def render(msgs: list[dict[str, str]], gen: bool = False) -> str:
            return str(tokenizer.apply_chat_template(msgs, tokenize=False,
                                                     add_generation_prompt=gen))

        return cls.from_renderer(render)

    @classmethod
    def from_jinja(cls, template: str, special_tokens: dict[str, Any] | None = None) -> ChatTemplate:
        """From a raw Jinja chat template (what a server's /get_model_info reports), rendered
        the way Hugging Face tokenizers render it (sandboxed, trim/lstrip blocks)."""
        from jinja2.exceptions import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        def strftime_now(fmt: str) -> str:
            return datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(
            x, ensure_ascii=False, indent=indent)
        env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
        compiled = env.from_string(template)
        extra = {k: v for k, v in (special_tokens or {}).items() if v is not None}

        def render(msgs: list[dict[str, str]], gen: bool = False) -> str:
            return str(compiled.render(messages=msgs, add_generation_prompt=gen, **extra))

        return cls.from_renderer(render)

    @classmethod
    def from_renderer(cls, render: Callable[..., str]) -> ChatTemplate:
        """Read each role's text around its content off renderings of sentinel messages;
        ``render(messages, gen)`` renders with or without the generation prompt."""
        sys_m = {"role": "system", "content": _MARK["system"]}
        user_m = {"role": "user", "content": _MARK["user"]}
        asst_m = {"role": "assistant", "content": _MARK["assistant"]}
        r_sys = render([sys_m])
        r_user = render([sys_m, user_m])
        r_asst = render([sys_m, user_m, asst_m])
        prefix, suffix = {}, {}
        prefix["system"], suffix["system"] = _split(r_sys, _MARK["system"], "system")
        prefix["user"], suffix["user"] = _split(_tail(r_user, r_sys, "user"), _MARK["user"],
                                                "user")
        prefix["assistant"], suffix["assistant"] = _split(
            _tail(r_asst, r_user, "assistant"), _MARK["assistant"], "assistant")
        # The generation prompt is what the chat endpoint ends with before the answer; use it
        # for assistant blocks so DSL prompts match chat-endpoint prompts token for token.
        gen_prefix = _tail(render([sys_m, user_m], gen=True), r_user, "generation prompt")
        if gen_prefix:
            prefix["assistant"] = gen_prefix
        alone = render([user_m])
        head = prefix["user"] + _MARK["user"]
        at = alone.find(head)
        default_system = alone[:at] if at > 0 else ""
        return cls(prefix, suffix, default_system)
