"""SGLang's native ``/generate`` body: one prompt or a batch (``text`` list / ``input_ids``
list of lists), per-prompt ``sampling_params`` / ``rid`` / logprob options, and SGLang's
sampling keys mapped onto ``SamplingParams``.

SGLang reads a null sampling key as its default, so do we. A key or field we cannot honour is
accepted at its default (null, false, empty) and refused with a 400 naming it otherwise:
never accepted and ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

import msgspec

from radixrt.sampling_params import MIN_TEMPERATURE, SamplingParams
from radixrt.server.errors import bad_request


class GenerateRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    text: str | list[str] | None = None
    input_ids: Any = None  # list[int] | list[list[int]]: checked by prompts()
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    rid: str | list[str] | None = None
    return_logprob: bool | list[bool] | None = None
    logprob_start_len: int | list[int] | None = None
    top_logprobs_num: int | list[int] | None = None
    return_text_in_logprobs: bool = False
    stream: bool = False
    cache_salt: str | None = None
    timeout: float | None = None
    # SGLang fields we take only at their default (see UNSUPPORTED_AT_DEFAULT).
    image_data: Any = None
    video_data: Any = None
    audio_data: Any = None
    input_embeds: Any = None
    lora_path: Any = None
    lora_id: Any = None
    token_ids_logprob: Any = None
    return_hidden_states: Any = None
    return_routed_experts: Any = None
    custom_logit_processor: Any = None
    session_params: Any = None
    data_parallel_rank: Any = None
    modalities: Any = None
    bootstrap_host: Any = None
    bootstrap_port: Any = None
    bootstrap_room: Any = None


# Fields of GenerateRequest that must stay null / false / empty: we have no such feature.
UNSUPPORTED_AT_DEFAULT = (
    "image_data", "video_data", "audio_data", "input_embeds", "lora_path", "lora_id",
    "token_ids_logprob", "return_hidden_states", "return_routed_experts",
    "custom_logit_processor", "session_params", "data_parallel_rank", "modalities",
    "bootstrap_host", "bootstrap_port", "bootstrap_room",
)
# Sampling keys SGLang sends that we take only at their default value.
_SAMPLING_DEFAULT_ONLY: dict[str, tuple[Any, ...]] = {
    "structural_tag": (),
    "custom_params": ({},),
    "stream_interval": (1,),  # we stream every step, i.e. interval 1
}
_PARAM_FIELDS = {f.name for f in fields(SamplingParams)}


@dataclass(frozen=True)
class LogprobOptions:
    """One prompt's SGLang logprob request (top-level return_logprob & co)."""

    start: int | None  # logprob_start_len; None (or -1): no input rows, output rows only
    top_k: int  # top_logprobs_num
    with_text: bool  # return_text_in_logprobs


@dataclass(frozen=True)
class NativePrompt:
    prompt: str | list[int]
    param: str  # "text" or "input_ids", for errors
    sampling: dict[str, Any]
    rid: str | None
    logprobs: LogprobOptions | None


def _is_ids(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def _per_prompt(value: Any, n: int, name: str, batched: bool) -> list[Any]:
    """A batch field: one value for every prompt, or a list of n (one per prompt)."""
    if isinstance(value, list):
        if not batched or len(value) != n:
            raise bad_request(f"{name} is a list of {len(value)}; it must be one value or, for "
                              f"a batch, a list of one per prompt ({n})", name)
        return value
    return [value] * n


def check_unsupported(req: GenerateRequest) -> None:
    for name in UNSUPPORTED_AT_DEFAULT:
        if getattr(req, name) not in (None, False, [], {}, ""):
            raise bad_request(f"{name} is not supported by this server (send null or leave it "
                              "out)", name)


def prompts(req: GenerateRequest) -> tuple[list[NativePrompt], bool]:
    """The request's prompts with their options; and whether it was a batch (answered with a
    list). Exactly one of text / input_ids."""
    check_unsupported(req)
    if (req.text is None) == (req.input_ids is None):
        raise bad_request("exactly one of text or input_ids is required", "text")
    param = "text" if req.text is not None else "input_ids"
    raw: Any = req.text if req.text is not None else req.input_ids
    if isinstance(raw, str) or (param == "input_ids" and _is_ids(raw)):
        batched, items = False, [raw]
    elif isinstance(raw, list) and raw and all(
            isinstance(x, str) if param == "text" else (_is_ids(x)) for x in raw):
        batched, items = True, list(raw)
    else:
        raise bad_request("text must be a string or a non-empty list of strings; input_ids a "
                          "list of token ids or a non-empty list of such lists", param)
    n = len(items)
    for item in items:
        if len(item) == 0:
            raise bad_request(f"{param} is empty", param)
    sps = _per_prompt(req.sampling_params, n, "sampling_params", batched)
    rids = _per_prompt(req.rid, n, "rid", batched)
    want = _per_prompt(req.return_logprob, n, "return_logprob", batched)
    starts = _per_prompt(req.logprob_start_len, n, "logprob_start_len", batched)
    tops = _per_prompt(req.top_logprobs_num, n, "top_logprobs_num", batched)
    if batched and req.rid is not None and len(set(rids)) != n:
        raise bad_request("rid must be distinct for every prompt of a batch", "rid")
    out = []
    for i, item in enumerate(items):
        lp = None
        if want[i]:
            start = starts[i]
            if start is not None and (isinstance(start, bool) or not isinstance(start, int)
                                      or start < -1):
                raise bad_request("logprob_start_len must be an int >= -1", "logprob_start_len")
            top = tops[i] or 0
            if isinstance(top, bool) or not isinstance(top, int) or top < 0:
                raise bad_request("top_logprobs_num must be an int >= 0", "top_logprobs_num")
            lp = LogprobOptions(None if start in (None, -1) else start, top,
                                req.return_text_in_logprobs)
        rid = rids[i]
        if rid is not None and (not isinstance(rid, str) or not rid or len(rid) > 256):
            raise bad_request("rid must be a non-empty string of at most 256 characters", "rid")
        out.append(NativePrompt(item if isinstance(item, str) else list(item), param,
                                dict(sps[i] or {}), rid, lp))
    return out, batched


def sampling_params(sp: dict[str, Any]) -> tuple[SamplingParams, int | None]:
    """SGLang / radixrt sampling keys -> (SamplingParams before the prompt is known, the
    max_new_tokens asked for or None)."""
    sp = {k: v for k, v in sp.items() if v is not None}  # SGLang: null = the default
    for key, allowed in _SAMPLING_DEFAULT_ONLY.items():
        if key in sp and sp.pop(key) not in allowed:
            raise bad_request(f"sampling_params.{key} is not supported by this server (send "
                              "null or leave it out)", key)
    if "max_tokens" in sp and "max_new_tokens" not in sp:
        sp["max_new_tokens"] = sp.pop("max_tokens")
    if "sampling_seed" in sp and "seed" not in sp:
        sp["seed"] = sp.pop("sampling_seed")
    spaces = sp.pop("spaces_between_special_tokens", None)
    if spaces is not None:
        if not isinstance(spaces, bool):
            raise bad_request("spaces_between_special_tokens must be a bool",
                              "spaces_between_special_tokens")
        # Special tokens are skipped by default, so there is nothing to space out; kept, they
        # are decoded as the fast tokenizer writes them (no spaces added).
        if spaces and sp.get("skip_special_tokens") is False:
            raise bad_request("spaces_between_special_tokens=true with skip_special_tokens="
                              "false is not supported (special tokens are decoded without "
                              "added spaces)", "spaces_between_special_tokens")
    t = sp.get("temperature")
    if isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t < MIN_TEMPERATURE:
        sp["temperature"] = 0.0  # SGLang reads a temperature this small as greedy
    if isinstance(sp.get("json_schema"), (dict, bool)):
        sp["json_schema"] = json.dumps(sp["json_schema"])
    if isinstance(sp.get("logit_bias"), dict):
        sp["logit_bias"] = tuple(sp["logit_bias"].items())
    unknown = sorted(set(sp) - _PARAM_FIELDS)
    if unknown:
        raise bad_request(f"Unknown sampling parameter(s): {', '.join(unknown)}",
                          "sampling_params")
    for k in ("stop", "stop_token_ids", "stop_regex"):
        if isinstance(sp.get(k), list):
            sp[k] = tuple(sp[k])
    asked = sp.get("max_new_tokens")
    if asked is not None and (isinstance(asked, bool) or not isinstance(asked, int)):
        raise bad_request(f"max_new_tokens must be an int, got {asked!r}", "max_new_tokens")
    # Validated now with a placeholder length; the real one is set once the prompt is known.
    sp["max_new_tokens"] = max(asked or 0, sp.get("min_new_tokens", 0)
                               if isinstance(sp.get("min_new_tokens"), int) else 0, 1)
    from radixrt.server.protocol import make_params

    return make_params(**sp), asked
