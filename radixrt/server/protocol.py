"""OpenAI-compatible and native request schemas, their validation, and OpenAI-style errors.

Bodies are decoded with msgspec against typed Structs (type errors name the JSON path), then
checked against the model (context window, vocabulary) and turned into ``SamplingParams``.
Every rejection is an ``APIError`` that renders as OpenAI's ``{"error": {...}}`` body.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import Any

import msgspec

from radixrt.sampling_params import SamplingParams
from radixrt.server import body
from radixrt.server import native_protocol as native

# Re-exported: handlers and tests use protocol.APIError / bad_request / error_body.
from radixrt.server.errors import APIError as APIError
from radixrt.server.errors import bad_request as bad_request
from radixrt.server.errors import error_body as error_body

# SGLang's /generate body lives with its parsing in native_protocol.
GenerateRequest = native.GenerateRequest
MAX_CACHE_SALT_LEN = 256
_FIELD_RE = re.compile(r"^([a-z_]+) ")
# SamplingParams field -> the name clients used.
_PARAM_ALIASES = {"max_new_tokens": "max_tokens"}


NO_TOKENIZER = "this server has no tokenizer: send token ids"


def no_tokenizer(why: str, param: str | None) -> APIError:
    """400 for input only a tokenizer could handle (a server started without one)."""
    return bad_request(f"{NO_TOKENIZER} ({why})", param)


def check_token_only(params: SamplingParams) -> None:
    """What a server without a tokenizer can't honour in otherwise valid sampling params."""
    if params.stop:
        raise no_tokenizer("stop strings are matched on text; use stop_token_ids instead",
                           "stop")
    if params.stop_regex:
        raise no_tokenizer("stop_regex is matched on text", "stop_regex")
    if params.constraint is not None:
        raise no_tokenizer("grammars are compiled against the tokenizer", params.constraint[0])


# ---------------------------------------------------------------------------- schemas


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool = False
    continuous_usage_stats: bool = False


# Unknown fields are refused (400 naming the field), never silently ignored.
class _Common(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    n: int = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    cache_salt: str | None = None
    timeout: float | None = None  # seconds from arrival; see request_timeout()
    logit_bias: dict[str, float] | None = None
    # vLLM's names for grammars (``guided_json`` etc.): honoured, see guided_constraint().
    guided_json: Any = None
    guided_regex: str | None = None
    guided_grammar: str | None = None
    guided_choice: list[str] | None = None


class ChatCompletionRequest(_Common, kw_only=True):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = None  # only with --allow-request-chat-template
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    # The pre-tools API: rejected by name rather than ignored.
    functions: Any = None
    function_call: Any = None


class CompletionRequest(_Common, kw_only=True):
    prompt: Any  # str | list[str] | list[int] | list[list[int]]: checked by prompt_inputs()
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    response_format: dict[str, Any] | None = None  # vLLM / SGLang accept it here too


DEFAULT_MAX_JSON_DEPTH = 64
MAX_REQUEST_TIMEOUT_S = 7 * 24 * 3600.0


def request_timeout(value: float | None) -> float | None:
    """The request's ``timeout`` (seconds from arrival, after which it is aborted with a 504);
    the server's ``--request-timeout`` still bounds it."""
    if value is None:
        return None
    if isinstance(value, bool) or not math.isfinite(value) or not 0 < value <= MAX_REQUEST_TIMEOUT_S:
        raise bad_request(f"timeout must be a number of seconds in (0, {MAX_REQUEST_TIMEOUT_S:g}]",
                          "timeout")
    return float(value)


def parse_body(raw: bytes, schema: type[Any], max_depth: int = DEFAULT_MAX_JSON_DEPTH) -> Any:
    """Decode a JSON body into ``schema``; malformed JSON, too deep nesting and wrong types
    become 400s naming the field."""
    return body.decode(raw, schema, max_depth)


# ---------------------------------------------------------------------------- validation


def validate_cache_salt(salt: Any) -> str | None:
    if salt is None:
        return None
    if (not isinstance(salt, str) or not salt or len(salt) > MAX_CACHE_SALT_LEN
            or not salt.isprintable()):
        raise bad_request(
            f"cache_salt must be a non-empty string of at most {MAX_CACHE_SALT_LEN} printable "
            "characters", "cache_salt")
    return salt


def check_sequences(num_prompts: int, n: int, cap: int) -> None:
    """Prompts x n is how many sequences one request puts in the engine."""
    if num_prompts * n > cap:
        raise bad_request(f"This request asks for {num_prompts} prompt(s) x n={n} = "
                          f"{num_prompts * n} sequences; this server's limit is {cap} "
                          "(--max-sequences-per-request)", "n" if n > 1 else "prompt")


def request_chat_template(req: ChatCompletionRequest, allowed: bool) -> str | None:
    """The client's own chat template (top-level or in chat_template_kwargs), if allowed."""
    kwargs = req.chat_template_kwargs or {}
    given = req.chat_template if req.chat_template is not None else kwargs.get("chat_template")
    if given is None:
        return None
    if not allowed:
        raise bad_request("chat_template is not accepted by this server (it runs as code in "
                          "the router; start it with --allow-request-chat-template)",
                          "chat_template")
    if not isinstance(given, str) or not given:
        raise bad_request("chat_template must be a non-empty string", "chat_template")
    return given


def check_model_name(requested: str | None, served: tuple[str, ...]) -> None:
    if requested is not None and requested not in served:
        # 400 (as the issue asks; OpenAI itself answers 404 here).
        raise APIError(400, f"The model `{requested}` does not exist. Available: "
                       f"{', '.join(served)}", "model")


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise bad_request(
                f"Token id {t!r} in {param} is outside the vocabulary (size {vocab_size})", param)


def prompt_inputs(prompt: Any) -> list[str | list[int]]:
    """Normalize a completions ``prompt`` into a list of texts or token-id lists."""
    def is_ids(x: Any) -> bool:
        return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                           for t in x)

    if isinstance(prompt, str):
        out: list[str | list[int]] = [prompt]
    elif is_ids(prompt) and prompt:
        out = [list(prompt)]
    elif isinstance(prompt, list) and prompt and all(
            isinstance(p, str) or (is_ids(p)) for p in prompt):
        out = [p if isinstance(p, str) else list(p) for p in prompt]
    else:
        raise bad_request("prompt must be a non-empty string, a list of strings, a list of "
                          "token ids, or a list of token-id lists", "prompt")
    for p in out:
        if len(p) == 0:
            raise bad_request("prompt must not be empty", "prompt")
    return out


def chat_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validate chat messages; flatten text content parts into strings for the template."""
    if not messages:
        raise bad_request("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        role = m.get("role")
        if role not in ("system", "user", "assistant", "tool", "developer"):
            raise bad_request(f"messages[{i}].role must be one of system, user, assistant, tool,"
                              f" developer; got {role!r}", "messages")
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(
                        part.get("text"), str):
                    raise bad_request(f"messages[{i}].content: only text parts are supported",
                                      "messages")
                texts.append(part["text"])
            content = "".join(texts)
        elif content is None:
            if role != "assistant":
                raise bad_request(f"messages[{i}].content is required", "messages")
            content = ""
        elif not isinstance(content, str):
            raise bad_request(f"messages[{i}].content must be a string or a list of text parts",
                              "messages")
        out.append({**m, "role": "system" if role == "developer" else role, "content": content})
    return out


@dataclass(frozen=True)
class ModelLimits:
    vocab_size: int
    max_context_len: int
    max_request_tokens: int | None = None  # server-wide cap on max_tokens


def check_lengths(prompt_len: int, max_tokens: int | None, limits: ModelLimits,
                  default_max_tokens: int | None, allow_zero: bool = False) -> int:
    """Checks the prompt and max_tokens against the context window; returns max_new_tokens.
    ``allow_zero``: 0 new tokens (native /generate: prefill only) is valid."""
    ctx = limits.max_context_len
    if prompt_len < 1:
        raise bad_request("The prompt is empty (0 tokens)", "prompt")
    if prompt_len >= ctx:
        raise bad_request(
            f"This model's maximum context length is {ctx} tokens. However, your prompt has "
            f"{prompt_len} tokens, which leaves no room for the completion.", "prompt")
    room = ctx - prompt_len
    if max_tokens is None:
        max_tokens = room if default_max_tokens is None else min(room, default_max_tokens)
        if limits.max_request_tokens is not None:
            max_tokens = min(max_tokens, limits.max_request_tokens)
    if isinstance(max_tokens, bool) or max_tokens < (0 if allow_zero else 1):
        raise bad_request(f"max_tokens must be at least {0 if allow_zero else 1}, got "
                          f"{max_tokens}", "max_tokens")
    if limits.max_request_tokens is not None and max_tokens > limits.max_request_tokens:
        raise bad_request(f"max_tokens ({max_tokens}) is over this server's limit of "
                          f"{limits.max_request_tokens}", "max_tokens")
    if max_tokens > room:
        raise bad_request(
            f"This model's maximum context length is {ctx} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for "
            "the completion). Please reduce the prompt or max_tokens.", "max_tokens")
    return max_tokens


def make_params(**kw: Any) -> SamplingParams:
    try:
        return SamplingParams(**kw)
    except (ValueError, TypeError) as e:
        msg = str(e)
        m = _FIELD_RE.match(msg)
        param = _PARAM_ALIASES.get(m.group(1), m.group(1)) if m else None
        if param is not None:
            msg = msg.replace(m.group(1) if m else "", param, 1)
        raise bad_request(msg, param) from None


def openai_params(req: ChatCompletionRequest | CompletionRequest) -> SamplingParams:
    """Sampling params before the prompt is known (max_new_tokens filled in later)."""
    if isinstance(req, ChatCompletionRequest):
        want_lp = req.logprobs
        top = req.top_logprobs or 0
        if top and not want_lp:
            raise bad_request("top_logprobs requires logprobs=true", "top_logprobs")
    else:
        want_lp = req.logprobs is not None
        top = req.logprobs or 0
    return make_params(
        logit_bias=_bias(req.logit_bias),
        max_new_tokens=1, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
        min_p=req.min_p, n=req.n, stop=req.stop, stop_token_ids=tuple(req.stop_token_ids or ()),
        seed=req.seed, presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty,
        ignore_eos=req.ignore_eos, skip_special_tokens=req.skip_special_tokens,
        logprobs=want_lp, top_logprobs=top)


def _bias(bias: dict[str, float] | None) -> tuple[tuple[Any, float], ...]:
    return tuple(bias.items()) if bias else ()


def native_params(sp: dict[str, Any] | None) -> SamplingParams:
    """/generate's sampling_params (SGLang's keys and ours), max_new_tokens as given."""
    params, asked = native.sampling_params(dict(sp or {}))
    return params if asked is None else with_params(params, max_new_tokens=asked)


def with_params(params: SamplingParams, **kw: Any) -> SamplingParams:
    """``replace`` whose validation errors are 400s naming the field."""
    return make_params(**{**{f.name: getattr(params, f.name) for f in fields(params)}, **kw})


def finalize_params(params: SamplingParams, prompt_len: int, max_tokens: int | None,
                    limits: ModelLimits, default_max_tokens: int | None,
                    allow_zero: bool = False) -> SamplingParams:
    n_new = check_lengths(prompt_len, max_tokens, limits, default_max_tokens, allow_zero)
    for t in params.stop_token_ids:
        if t >= limits.vocab_size:
            raise bad_request(f"stop_token_ids contains {t}, outside the vocabulary (size "
                              f"{limits.vocab_size})", "stop_token_ids")
    for t, _ in params.logit_bias:
        if t >= limits.vocab_size:
            raise bad_request(f"logit_bias has token id {t}, outside the vocabulary (size "
                              f"{limits.vocab_size})", "logit_bias")
    return with_params(params, max_new_tokens=n_new)
