"""``RuntimeEndpoint``: runs DSL programs against a radixrt or SGLang server over HTTP, with
the requests SGLang's own frontend sends (native ``/generate``, ``/get_model_info``,
``/flush_cache``, ``/server_info``). Prompts travel as text; the server tokenizes, so its
radix cache sees the same token prefixes for every request that shares a stem."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from radixrt.lang.backends import Prompt
from radixrt.lang.chat_template import ChatTemplate
from radixrt.lang.params import BackendError, GenChunk, GenParams, GenResult
from radixrt.lang.scoring import PromptScores


def _error_message(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return r.text[:500] or r.reason_phrase
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict) and "message" in err:
        return str(err["message"])
    return json.dumps(body)[:500]


class RuntimeEndpoint:
    """A radixrt (or SGLang) server at ``url``.

    Role blocks use the chat template the server reports in ``/get_model_info``
    (``chat_template``, radixrt's servers send it). For a server that does not (SGLang's),
    pass ``tokenizer`` (a HF tokenizer or a path to one); a ``model_path`` that exists on this
    machine is used too.
    """

    def __init__(self, base_url: str, api_key: str | None = None, verify: Any = None,
                 chat_template_name: str | None = None, *, tokenizer: Any = None,
                 timeout: float = 300.0) -> None:
        if chat_template_name is not None:
            raise ValueError("chat_template_name is not supported: radixrt uses the model's own "
                             "chat template (from the server, or tokenizer=...)")
        self.url = self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout,
                                  verify=True if verify is None else verify)
        self._tokenizer = tokenizer
        self._template: ChatTemplate | None = None
        self.model_info = self._get("/get_model_info")  # fails fast on a bad url or key
        self.model_id = str(self.model_info.get("served_model_name")
                            or self.model_info.get("model_path"))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RuntimeEndpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get_model_name(self) -> str:
        return str(self.model_info.get("model_path"))

    # ---- HTTP --------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            r = self._http.request(method, path, json=body)
        except httpx.HTTPError as e:
            raise BackendError(f"request to {self.url}{path} failed: {e}") from e
        if r.status_code != 200:
            raise BackendError(_error_message(r), r.status_code)
        return r.json()

    def _get(self, path: str) -> dict[str, Any]:
        out = self._request("GET", path)
        if not isinstance(out, dict):
            raise BackendError(f"{path} answered {type(out).__name__}, not a JSON object")
        return out

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        out = self._request("POST", "/generate", body)
        if not isinstance(out, dict):
            raise BackendError("/generate answered a list for one prompt")
        return out

    def _post_batch(self, body: dict[str, Any], n: int) -> list[dict[str, Any]]:
        out = self._request("POST", "/generate", body)
        if not isinstance(out, list) or len(out) != n:
            raise BackendError(f"/generate answered {type(out).__name__} for a batch of {n}")
        return out

    # ---- Backend -----------------------------------------------------------------------
    def _body(self, prompt: str, params: GenParams) -> dict[str, Any]:
        return {"text": prompt, "sampling_params": params.sampling_dict(),
                **params.logprob_dict()}

    def generate(self, prompt: str, params: GenParams) -> GenResult:
        out = self._request("POST", "/generate", self._body(prompt, params))
        if isinstance(out, list):  # n > 1: one object per sample (SGLang's shape)
            results = [_result(x) for x in out]
            first = results[0]
            first.texts = [r.text for r in results]
            first.completion_tokens = sum(r.completion_tokens for r in results)
            return first
        return _result(out)

    def stream(self, prompt: str, params: GenParams) -> Iterator[GenChunk]:
        body = {**self._body(prompt, params), "stream": True}
        sent, last = "", None
        try:
            with self._http.stream("POST", "/generate", json=body) as r:
                if r.status_code != 200:
                    r.read()
                    raise BackendError(_error_message(r), r.status_code)
                for line in r.iter_lines():
                    if not line.startswith("data:") or line.strip() == "data: [DONE]":
                        continue
                    event = json.loads(line[5:].strip())
                    if "error" in event:
                        err = event["error"]
                        raise BackendError(str(err.get("message", err)), err.get("code"))
                    # Native stream events carry the whole text so far, as SGLang's do.
                    text = str(event["text"])
                    if len(text) > len(sent):
                        yield GenChunk(text[len(sent):], meta=event.get("meta_info"))
                        sent = text
                    last = event
        except httpx.HTTPError as e:
            raise BackendError(f"stream from {self.url}/generate failed: {e}") from e
        if last is None:
            raise BackendError("the server closed the stream without a result")
        yield GenChunk("", _result(last))

    def prompt_logprobs(self, prompts: Sequence[Prompt],
                        logprob_start_len: int = 0) -> list[PromptScores]:
        """One batched request, as SGLang's select sends it: ``max_new_tokens`` 0 and
        ``return_logprob`` from ``logprob_start_len``."""
        key = "input_ids" if prompts and not isinstance(prompts[0], str) else "text"
        body: dict[str, Any] = {key: list(prompts), "sampling_params": {
            "max_new_tokens": 0, "temperature": 0}, "return_logprob": True,
            "logprob_start_len": logprob_start_len}
        if key == "text":
            body["return_text_in_logprobs"] = True
        scores = []
        for out in self._post_batch(body, len(prompts)):
            meta = out.get("meta_info", {})
            rows = meta.get("input_token_logprobs")
            if rows is None:
                raise BackendError("the server returned no prompt logprobs "
                                   "(meta_info.input_token_logprobs); select needs them")
            try:
                scores.append(PromptScores.from_rows(rows, logprob_start_len,
                                                     int(meta["prompt_tokens"]),
                                                     int(meta.get("cached_tokens", 0))))
            except ValueError as e:
                raise BackendError(f"unexpected input_token_logprobs: {e}") from e
        return scores

    def cache_prefix(self, prompt: str) -> GenResult:
        return _result(self._post({"text": prompt, "sampling_params": {"max_new_tokens": 0}}))

    def flush_cache(self) -> bool:
        self._request("POST", "/flush_cache")
        return True

    def get_server_info(self) -> dict[str, Any]:
        try:
            return self._get("/server_info")
        except BackendError as e:
            if e.status != 404:
                raise
            return self._get("/get_server_info")  # older servers' name

    def reasoning_parser(self) -> str | None:
        parser = self.model_info.get("reasoning_parser")
        return str(parser) if parser else None

    def chat_template(self) -> ChatTemplate:
        if self._template is None:
            self._template = self._load_template()
        return self._template

    def _load_template(self) -> ChatTemplate:
        if self._tokenizer is not None:
            return ChatTemplate.from_tokenizer(_tokenizer(self._tokenizer))
        info = self.model_info
        template = info.get("chat_template")
        if isinstance(template, str) and template:
            special = dict(info.get("special_tokens") or {})
            for k in ("bos_token", "eos_token"):
                if info.get(k) is not None:
                    special.setdefault(k, info[k])
            return ChatTemplate.from_jinja(template, special)
        for key in ("tokenizer_path", "model_path"):
            path = info.get(key)
            if isinstance(path, str) and path and Path(path).exists():
                return ChatTemplate.from_tokenizer(_tokenizer(path))
        raise BackendError(
            f"role blocks need the model's chat template, and {self.url}/get_model_info has no "
            f"chat_template: pass RuntimeEndpoint({self.url!r}, tokenizer=PATH_OR_TOKENIZER)")


def _tokenizer(tok: Any) -> Any:
    if isinstance(tok, (str, Path)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tok))
    return tok


def _result(out: dict[str, Any]) -> GenResult:
    meta = out.get("meta_info", {})
    finish = meta.get("finish_reason")
    reason = finish.get("type") if isinstance(finish, dict) else finish
    if reason == "abort":
        raise BackendError(f"the server aborted the request: {finish}")
    extra = {k: v for k, v in meta.items() if "logprob" in k}
    return GenResult(str(out.get("text", "")), int(meta.get("prompt_tokens", 0)),
                     int(meta.get("cached_tokens", 0)), int(meta.get("completion_tokens", 0)),
                     reason, [str(out.get("text", ""))], extra)
