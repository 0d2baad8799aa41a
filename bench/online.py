"""Online driver: stream a workload against a running server (``python -m radixrt.serve``).

Conversations start by a Poisson process (``request_rate`` per second; inf = all at once) and run
their turns one after the other; ``max_concurrency`` caps requests in flight, as SGLang's
bench_serving does. Endpoints:

* ``generate`` (native, SGLang-shaped): token ids in, cumulative ``output_ids`` and
  ``meta_info.cached_tokens`` per chunk: exact token counts, needed for multi-turn chat.
* ``completions`` (OpenAI ``/v1/completions`` with a token-id prompt): one timestamp per streamed
  text chunk; counts and cached tokens from the final ``usage``. Generated ids are not returned,
  so this endpoint serves single-turn workloads only.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from tqdm import tqdm

from bench.metrics import RequestRecord
from bench.offline import RunOutput
from bench.workloads import Histories, Workload

TIMEOUT_S = 6 * 3600.0


def _payload(endpoint: str, prompt: list[int], max_new: int) -> dict[str, Any]:
    if endpoint == "generate":
        return {"input_ids": prompt, "stream": True,
                "sampling_params": {"max_new_tokens": max_new, "temperature": 0.0,
                                    "ignore_eos": True}}
    return {"prompt": prompt, "max_tokens": max_new, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}


async def _sse(resp: Any) -> AsyncIterator[dict[str, Any]]:
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


async def _request(client: Any, url: str, endpoint: str, rec: RequestRecord, t0: float) -> None:
    path = "/generate" if endpoint == "generate" else "/v1/completions"
    try:
        async with client.stream("POST", url + path,
                                 json=_payload(endpoint, rec.prompt_ids, rec.max_new_tokens)) as resp:
            if resp.status_code != 200:
                rec.error = f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}"
                return
            async for obj in _sse(resp):
                now = time.perf_counter() - t0
                if "error" in obj:
                    rec.error = str(obj["error"])
                    return
                if endpoint == "generate":
                    ids = obj.get("output_ids", [])
                    if len(ids) > len(rec.output_ids):
                        rec.output_ids = list(ids)
                        rec.chunk_times.append(now)
                    meta = obj.get("meta_info", {})
                    rec.cached_tokens = int(meta.get("cached_tokens", rec.cached_tokens))
                    fin = meta.get("finish_reason")
                    if fin:
                        rec.finish_reason = fin.get("type") if isinstance(fin, dict) else fin
                else:
                    for ch in obj.get("choices", []):
                        if ch.get("text"):
                            rec.chunk_times.append(now)
                        if ch.get("finish_reason"):
                            rec.finish_reason = ch["finish_reason"]
                    usage = obj.get("usage")
                    if usage:
                        details = usage.get("prompt_tokens_details") or {}
                        rec.cached_tokens = int(details.get("cached_tokens", 0))
                        # Ids are not streamed back: keep the count right for the metrics.
                        rec.output_ids = [-1] * int(usage.get("completion_tokens", 0))
    except Exception as e:  # a failed request is a data point, not a crashed benchmark
        rec.error = f"{type(e).__name__}: {e}"


async def _run(workload: Workload, url: str, endpoint: str, request_rate: float,
               max_concurrency: int | None, api_key: str | None, max_context: int | None,
               progress: bool, seed: int) -> RunOutput:
    import httpx

    if endpoint == "completions" and workload.multi_turn:
        raise ValueError("multi-turn workloads need generated token ids: use --endpoint generate")
    hist = Histories(workload, max_context)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    rng = np.random.default_rng(seed)
    n = len(workload.conversations)
    gaps = rng.exponential(1.0 / request_rate, size=n) if np.isfinite(request_rate) else np.zeros(n)
    starts = np.cumsum(gaps) - gaps[0]
    records: list[RequestRecord] = []
    dropped = 0
    bar = tqdm(total=workload.num_requests, desc=f"{workload.name} online", unit="req",
               disable=not progress, mininterval=1.0)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=TIMEOUT_S, headers=headers, limits=limits) as client:

        async def conversation(c: int) -> None:
            nonlocal dropped
            await asyncio.sleep(max(0.0, float(starts[c]) - (time.perf_counter() - t0)))
            turns = workload.conversations[c].turns
            for t, turn in enumerate(turns):
                prompt = hist.prompt(c, t)
                if prompt is None:
                    dropped += len(turns) - t
                    bar.update(len(turns) - t)
                    return
                rec = RequestRecord(f"{c}-{t}", c, t, prompt, turn.max_new_tokens, 0.0)
                records.append(rec)
                if sem is not None:
                    async with sem:
                        rec.arrival = time.perf_counter() - t0
                        await _request(client, url, endpoint, rec, t0)
                else:
                    rec.arrival = time.perf_counter() - t0
                    await _request(client, url, endpoint, rec, t0)
                bar.update(1)
                if not rec.ok:
                    dropped += len(turns) - t - 1
                    bar.update(len(turns) - t - 1)
                    return
                hist.finish(c, prompt, rec.output_ids)

        await asyncio.gather(*(conversation(c) for c in range(n)))
    duration = time.perf_counter() - t0
    bar.close()
    return RunOutput(records, duration, dropped, 0, 0, 0,
                     {"endpoint": endpoint, "request_rate": request_rate,
                      "max_concurrency": max_concurrency or 0})


def run_online(workload: Workload, *, url: str, endpoint: str = "generate",
               request_rate: float = float("inf"), max_concurrency: int | None = None,
               api_key: str | None = None, max_context: int | None = None,
               progress: bool = True, seed: int = 0) -> RunOutput:
    return asyncio.run(_run(workload, url.rstrip("/"), endpoint, request_rate, max_concurrency,
                            api_key, max_context, progress, seed))
