"""The router's tokenizer: text <-> token ids and the chat template (the worker never sees text).

A server without a tokenizer (a model that has none, or --skip-tokenizer-init) has no TextCodec
at all: the router then takes and returns token ids only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from radixrt.server.protocol import APIError, bad_request
from radixrt.text.template_sandbox import TemplateBusy, TemplateError, TemplateSandbox


def load_tokenizer(model_path: str) -> Any:
    """AutoTokenizer from a HF directory, or from a .gguf file's embedded vocabulary."""
    from transformers import AutoTokenizer

    p = Path(model_path)
    if p.is_file() and p.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    return AutoTokenizer.from_pretrained(str(p))


def load_codec(model_path: str | None, skip_tokenizer_init: bool) -> TextCodec | None:
    """The router's codec, or None to serve token ids only: when asked to, or when the worker
    reported no model path (dummy weights: there is no tokenizer to load)."""
    if skip_tokenizer_init or model_path is None:
        return None
    return TextCodec(load_tokenizer(model_path))


class TextCodec:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._piece_cache: dict[int, str] = {}

    def encode(self, text: str) -> list[int]:
        # Completions prompts get the model's BOS etc., as in vLLM/SGLang.
        return list(self.tokenizer.encode(text, add_special_tokens=True))

    def chat_ids(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                 continue_final_message: bool = False,
                 template_kwargs: dict[str, Any] | None = None,
                 client_template: tuple[str, TemplateSandbox] | None = None) -> list[int]:
        """Token ids of the chat prompt. ``client_template``: a request's own template and the
        sandbox that renders it (the model's template is trusted and renders here)."""
        if continue_final_message and add_generation_prompt:
            add_generation_prompt = False  # continuing a message means no new turn header
        kwargs = {k: v for k, v in (template_kwargs or {}).items() if k != "chat_template"}
        if client_template is not None:
            template, sandbox = client_template
            specials = {k: v for k, v in self.tokenizer.special_tokens_map.items()
                        if isinstance(v, str)}
            try:
                text = sandbox.render(template, messages, add_generation_prompt,
                                      continue_final_message, {**specials, **kwargs})
            except TemplateError as e:
                raise bad_request(f"chat_template failed: {e}", "chat_template") from None
            except TemplateBusy as e:
                raise APIError(503, str(e)) from None
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise bad_request("This model has no chat template; use /v1/completions", "messages")
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, **kwargs)
        except Exception as e:  # jinja raise_exception(), bad roles, ...: the caller's input
            raise bad_request(f"Chat template failed on these messages: {e}",
                              "messages") from None
        # The template already wrote BOS/special tokens as text; don't add them twice.
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def piece(self, token_id: int) -> str:
        """Text of one token alone (for logprobs entries)."""
        s = self._piece_cache.get(token_id)
        if s is None:
            s = self.tokenizer.decode([token_id], skip_special_tokens=False,
                                      clean_up_tokenization_spaces=False)
            if len(self._piece_cache) < 200_000:
                self._piece_cache[token_id] = s
        return s

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens,
                                         clean_up_tokenization_spaces=False))
