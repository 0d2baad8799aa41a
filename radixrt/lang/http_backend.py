"""``RuntimeEndpoint``: runs DSL programs against a radixrt server over HTTP (native
``/generate``). Prompts travel as text; the server tokenizes, so its radix cache sees the same
token prefixes for every request that shares a stem."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from radixrt.lang.backends import BackendError, GenChunk, GenParams, GenResult
from radixrt.lang.chat_template import ChatTemplate
from radixrt.lang.scoring import PromptScores

MAX_PARALLEL_SCORES = 16


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
    """A radixrt (or SGLang-compatible) server at ``url``.

    ``tokenizer`` (a HF tokenizer or a path to one) gives the chat template for role blocks;
    when omitted it is loaded from the server's model path if that path exists locally.
    """

    def __init__(self, url: str, api_key: str | None = None, *, tokenizer: Any = None,
                 timeout: float = 300.0) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        self._tokenizer = tokenizer
        self._template: ChatTemplate | None = None
        self.model_id = self._model_id()  # fails fast on a bad url or key

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RuntimeEndpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- HTTP --------------------------------------------------------------------------
    def _model_id(self) -> str:
        try:
            r = self._http.get("/v1/models")
        except httpx.HTTPError as e:
            raise BackendError(f"cannot reach the server at {self.url}: {e}") from e
        if r.status_code != 200:
            raise BackendError(_error_message(r), r.status_code)
        return str(r.json()["data"][0]["id"])

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            r = self._http.post("/generate", json=body)
        except httpx.HTTPError as e:
            raise BackendError(f"request to {self.url}/generate failed: {e}") from e
        if r.status_code != 200:
            raise BackendError(_error_message(r), r.status_code)
        out = r.json()
        assert isinstance(out, dict), "one prompt, one response object"
        return out

    # ---- Backend -----------------------------------------------------------------------
    def generate(self, prompt: str, params: GenParams) -> GenResult:
        return _result(self._post({"text": prompt, "sampling_params": params.as_dict()}))

    def stream(self, prompt: str, params: GenParams) -> Iterator[GenChunk]:
        body = {"text": prompt, "sampling_params": params.as_dict(), "stream": True}
        sent, last = "", None
        try:
            with self._http.stream("POST", "/generate", json=body) as r:
                if r.status_code != 200:
                    r.read()
                    raise BackendError(_error_message(r), r.status_code)
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        err = event["error"]
                        raise BackendError(str(err.get("message", err)), err.get("code"))
                    # Native stream events carry the whole text so far, as SGLang's do.
                    text = str(event["text"])
                    if len(text) > len(sent):
                        yield GenChunk(text[len(sent):])
                        sent = text
                    last = event
        except httpx.HTTPError as e:
            raise BackendError(f"stream from {self.url}/generate failed: {e}") from e
        if last is None:
            raise BackendError("the server closed the stream without a result")
        yield GenChunk("", _result(last))

    def prompt_logprobs(self, prompts: Sequence[str],
                        logprob_start_len: int = 0) -> list[PromptScores]:
        def one(text: str) -> PromptScores:
            out = self._post({"text": text, "sampling_params": {
                "max_new_tokens": 1, "temperature": 0.0, "prompt_logprobs": True,
                "logprob_start_len": logprob_start_len}})
            meta = out.get("meta_info", {})
            rows = meta.get("input_token_logprobs")
            if rows is None:
                raise BackendError("the server returned no prompt logprobs "
                                   "(meta_info.input_token_logprobs); select needs them")
            # SGLang's layout: one [logprob, token_id, ...] row per prompt token.
            ids = [int(r[1]) for r in rows]
            lps = [None if r[0] is None else float(r[0]) for r in rows]
            return PromptScores(ids, lps, int(meta["prompt_tokens"]), int(meta["cached_tokens"]))

        if len(prompts) <= 1:
            return [one(p) for p in prompts]
        with ThreadPoolExecutor(min(len(prompts), MAX_PARALLEL_SCORES)) as ex:
            return list(ex.map(one, prompts))

    def cache_prefix(self, prompt: str) -> GenResult:
        return self.generate(prompt, GenParams(max_tokens=1, temperature=0.0))

    def chat_template(self) -> ChatTemplate:
        if self._template is None:
            self._template = ChatTemplate.from_tokenizer(self._load_tokenizer())
        return self._template

    def _load_tokenizer(self) -> Any:
        tok = self._tokenizer
        if tok is None:
            # The server lists its model under its served name; it is a path when served from
            # a local directory without --served-model-name.
            if not Path(self.model_id).exists():
                raise BackendError(
                    "role blocks need the model's chat template: pass "
                    f"RuntimeEndpoint({self.url!r}, tokenizer=PATH_OR_TOKENIZER)")
            tok = self.model_id
        if isinstance(tok, (str, Path)):
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(tok))
        return tok


def _result(out: dict[str, Any]) -> GenResult:
    meta = out.get("meta_info", {})
    finish = meta.get("finish_reason")
    reason = finish.get("type") if isinstance(finish, dict) else finish
    if reason == "abort":
        raise BackendError(f"the server aborted the request: {finish}")
    return GenResult(str(out["text"]), int(meta.get("prompt_tokens", 0)),
                     int(meta.get("cached_tokens", 0)), int(meta.get("completion_tokens", 0)),
                     reason)
