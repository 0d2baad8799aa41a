"""Baseline: Hugging Face transformers ``generate`` on the same model shape and prompts, batched.

No prefix cache, static batches: a batch runs until its longest request is done, then the next
starts. Requests are batched in workload order per turn (a chat turn needs the previous turn's
outputs, so turn t of every conversation is one round). Every request arrives at t=0 (turn t:
when its conversation's previous turn ended), so TTFT includes the wait for earlier batches, as
in the engine's offline runs.

Per-step times come from a streamer (its ``put`` receives each step's tokens on the host, which
synchronizes with the device).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from bench.metrics import RequestRecord
from bench.offline import RunOutput
from bench.workloads import Histories, Workload

_MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}


def load_hf_model(model: str, hf_config: Mapping[str, Any], *, device: str,
                  dtype: torch.dtype, seed: int = 0) -> Any:
    """The checkpoint when ``model`` is a directory, else random weights of the preset's shape."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    if Path(model).is_dir():
        auto: Any = AutoModelForCausalLM
        try:
            m = auto.from_pretrained(model, dtype=dtype)
        except TypeError:  # transformers < 4.56 calls it torch_dtype
            m = auto.from_pretrained(model, torch_dtype=dtype)
        return m.to(device).eval()
    cfg_dict = dict(hf_config)
    arch = cfg_dict.pop("architectures", ["LlamaForCausalLM"])[0]
    cfg_dict.pop("torch_dtype", None)
    cfg = AutoConfig.for_model(_MODEL_TYPES[arch], **cfg_dict)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the run dtype: an fp32 8B would not fit twice
    try:
        with torch.device(device):
            m = AutoModelForCausalLM.from_config(cfg)
    finally:
        torch.set_default_dtype(prev)
    return m.eval()


class _StepClock:
    """Streamer that records when each generation step's tokens reach the host."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # the first put is the prompt itself
            self._prompt_seen = True
            return
        value.cpu()
        self.times.append(time.perf_counter() - self.t0)

    def end(self) -> None:
        pass


def run_hf(model: Any, workload: Workload, *, batch_size: int, max_context: int,
           progress: bool = True, max_requests: int | None = None) -> RunOutput:
    device = next(model.parameters()).device
    hist = Histories(workload, max_context)
    convs = list(range(len(workload.conversations)))
    if max_requests is not None:  # a prefix of the conversations (documented in the results)
        keep: list[int] = []
        n = 0
        for c in convs:
            n += len(workload.conversations[c].turns)
            if n > max_requests and keep:
                break
            keep.append(c)
        convs = keep
    total = sum(len(workload.conversations[c].turns) for c in convs)
    bar = tqdm(total=total, desc=f"{workload.name} hf", unit="req", disable=not progress,
               mininterval=1.0)
    records: list[RequestRecord] = []
    dropped = 0
    ready = {c: 0.0 for c in convs}  # when each conversation's next turn arrives
    t0 = time.perf_counter()
    max_turns = max(len(workload.conversations[c].turns) for c in convs)
    for turn in range(max_turns):
        round_recs: list[RequestRecord] = []
        for c in convs:
            if not hist.has_turn(c, turn) or c not in ready:
                continue
            prompt = hist.prompt(c, turn)
            if prompt is None:
                dropped += len(workload.conversations[c].turns) - turn
                ready.pop(c)
                continue
            t = workload.conversations[c].turns[turn]
            round_recs.append(RequestRecord(f"hf-{c}-{turn}", c, turn, prompt, t.max_new_tokens,
                                            ready[c]))
        # Similar output lengths together: a static batch runs as long as its longest member.
        round_recs.sort(key=lambda r: -r.max_new_tokens)
        for i in range(0, len(round_recs), batch_size):
            batch = round_recs[i : i + batch_size]
            _generate(model, batch, device, t0)
            for r in batch:
                hist.finish(r.conversation, r.prompt_ids, r.output_ids)
                ready[r.conversation] = r.chunk_times[-1]
            bar.update(len(batch))
        records.extend(round_recs)
    duration = time.perf_counter() - t0
    bar.close()
    return RunOutput(records, duration, dropped, 0, 0, 0, {"batch_size": batch_size,
                                                           "requests_run": total})


@torch.inference_mode()
def _generate(model: Any, batch: list[RequestRecord], device: torch.device, t0: float) -> None:
    width = max(r.prompt_len for r in batch)
    pad = 0
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, r in enumerate(batch):  # left padding: every row's last prompt token is aligned
        ids[i, width - r.prompt_len :] = torch.tensor(r.prompt_ids)
        mask[i, width - r.prompt_len :] = 1
    new = max(r.max_new_tokens for r in batch)
    clock = _StepClock(t0)
    out = model.generate(
        input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new,
        min_new_tokens=new, do_sample=False, pad_token_id=pad, streamer=clock,
        eos_token_id=None,
    )
    gen = out[:, width:].tolist()
    for i, r in enumerate(batch):
        r.output_ids = gen[i][: r.max_new_tokens]
        r.chunk_times = clock.times[: r.max_new_tokens]
        r.finish_reason = "length"
