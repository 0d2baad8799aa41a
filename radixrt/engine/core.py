"""EngineCore: everything a worker runs, built from one EngineConfig.

model + KV pool + attention backend -> ModelRunner; page allocator + radix cache ->
SequenceMemory; those + sampler -> Scheduler. Token ids in, token ids out; no text here.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import msgspec
import torch

from radixrt.cache.kv_pool import KVPool
from radixrt.cache.native import make_page_allocator
from radixrt.cache.prefix_cache import make_prefix_cache
from radixrt.cache.transfer import make_host_tier
from radixrt.config import EngineConfig
from radixrt.constrained.sequences import SequenceGrammars
from radixrt.distributed.launch import build_runner, start_tensor_parallel
from radixrt.engine.memory import SequenceMemory, load_waste_ratio
from radixrt.engine.outputs import COUNTER_EXTRAS, COUNTER_FIELDS, EngineStats, SequenceDelta
from radixrt.engine.sampler import Sampler
from radixrt.engine.scheduler import Scheduler
from radixrt.engine.warmup import warm_up
from radixrt.models.args import ModelArgs
from radixrt.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# On CPU, without an explicit budget, size the pool for this many tokens or this many bytes.
CPU_DEFAULT_KV_TOKENS = 16384
CPU_DEFAULT_KV_BYTES = 1 << 30


# Errors after which the device, and so this process, cannot be trusted (vs. one bad request).
_DEVICE_FAULT_MARKERS = ("CUDA error", "CUBLAS_STATUS", "cuDNN error", "device-side assert",
                         "illegal memory access", "NCCL error", "HIP error",
                         "tensor-parallel peer lost")


def is_device_fault(e: BaseException) -> bool:
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(e, accelerator_error):
        return True
    return isinstance(e, RuntimeError) and any(k in str(e) for k in _DEVICE_FAULT_MARKERS)


@dataclass(frozen=True)
class ModelInfo:
    model_name: str
    model_path: str | None  # a HF directory holding the tokenizer (None for dummy weights)
    vocab_size: int
    max_context_len: int
    eos_token_ids: tuple[int, ...]


def kv_pool_pages(config: EngineConfig, args: ModelArgs, device: torch.device) -> int:
    """Pages in the pool: from the explicit token budget, else from free memory."""
    per_page = KVPool.bytes_per_page(
        num_layers=args.num_layers, page_size=config.page_size,
        num_kv_heads=args.num_kv_heads, head_dim=args.head_dim, dtype=config.torch_dtype,
    )
    if config.kv_cache_tokens is not None:
        return -(-config.kv_cache_tokens // config.page_size)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        # Leave (1 - mem_fraction) of the card for activations, CUDA graphs and the allocator.
        budget = free - (1.0 - config.mem_fraction) * total
        pages = int(budget // per_page)
        if pages < 1:
            raise ValueError(
                f"no GPU memory left for the KV cache ({free / 2**30:.1f} GiB free of "
                f"{total / 2**30:.1f}); raise mem_fraction or use a smaller model"
            )
        return pages
    by_bytes = CPU_DEFAULT_KV_BYTES // per_page
    return max(1, min(-(-CPU_DEFAULT_KV_TOKENS // config.page_size), by_bytes))


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        device = torch.device(config.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' was requested but no CUDA GPU is available")
        torch.manual_seed(config.seed)
        # Model, KV pool, attention backend and runner (launch.build_runner); with tp_size > 1
        # the follower ranks are started first and hold the other shards.
        if config.tp_size > 1:
            built, _ = start_tensor_parallel(config)
        else:
            built = build_runner(config, device, None)
        loaded, pool, num_pages, max_context = built.loaded, built.pool, built.num_pages, built.max_context
        self.tokenizer: Any = loaded.tokenizer
        args = loaded.args
        self.args = args
        self.runner = built.runner
        allocator = make_page_allocator(num_pages)  # native refcounts when the core is built
        tier = make_host_tier(pool, config.host_kv_cache_tokens)
        cache = make_prefix_cache(allocator, config.page_size, config.enable_prefix_cache, tier)
        # A full prefill step's worth of the oldest GPU cache stays written down ahead of need.
        memory = SequenceMemory(allocator, cache, config.page_size, self.runner.copy_pages,
                                backup_ahead_pages=2 * config.max_prefill_tokens // config.page_size)
        eos = set(args.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(int(self.tokenizer.eos_token_id))
        # Owned here (closed by close()): the scheduler's results use it.
        self._grammars = SequenceGrammars(self.tokenizer, args.vocab_size, device, eos)
        self.scheduler = Scheduler(
            config, self.runner, memory, Sampler(), vocab_size=args.vocab_size,
            max_context_len=max_context, eos_token_ids=eos,
            grammars=self._grammars,
        )
        self.model_info = ModelInfo(
            model_name=loaded.source,
            model_path=loaded.source if os.path.isdir(loaded.source) else None, vocab_size=args.vocab_size,
            max_context_len=max_context, eos_token_ids=tuple(sorted(eos)),
        )
        logger.info(
            "KV pool: %d pages x %d tokens (%.2f GiB, %s) on %s", num_pages, config.page_size,
            pool.total_bytes / 2**30, config.torch_dtype, device,
        )
        # Counters as the warm-up left them: stats() reports traffic since, not its requests.
        self._counters_base: EngineStats | None = None
        # What the start-up warm-up ran and compiled (None: skipped).
        self.warmup_report: dict[str, Any] | None = warm_up(self) if config.warmup_enabled else None
        if self.warmup_report is not None:
            self._counters_base = self.scheduler.stats()

    def add_request(
        self, rid: str, input_ids: list[int], params: SamplingParams, namespace: str | None = None
    ) -> None:
        self.scheduler.add_request(rid, input_ids, params, namespace)

    def abort_request(self, rid: str, index: int | None = None) -> None:
        self.scheduler.abort_request(rid, index)

    def step(self) -> list[SequenceDelta]:
        return self.scheduler.step()

    def step_isolating_faults(self) -> list[SequenceDelta]:
        """One step for a server: a step that raises (other than a device fault) fails the
        requests the scheduler held, running and queued (admission is part of the step), with
        the error in each delta, and the engine goes on serving. Device faults, and a failure
        that leaves the page accounting inconsistent, are re-raised: the process must be
        replaced. (In-process callers use ``step``, which lets every error through.)"""
        try:
            return self.scheduler.step()
        except Exception as e:
            if is_device_fault(e):
                raise
            logger.exception("scheduler step failed; failing the requests it held")
            return self._fail_held(f"{type(e).__name__}: {e}")

    def _fail_held(self, why: str) -> list[SequenceDelta]:
        deltas = self.scheduler.fail_all(f"scheduler step failed: {why}")
        self.check_invariants()  # raises if the failure left pages unaccounted for
        return deltas

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def stats(self) -> EngineStats:
        now = self.scheduler.stats()
        base = self._counters_base
        if base is None:
            return now
        since = {name: getattr(now, name) - getattr(base, name) for name in COUNTER_FIELDS}
        extra = {k: v - base.extra.get(k, 0.0) if k in COUNTER_EXTRAS else v
                 for k, v in now.extra.items()}  # fmt: skip
        if "host_load_waste_ratio" in extra:
            extra["host_load_waste_ratio"] = load_waste_ratio(extra["host_loaded_tokens"],
                                                              extra["host_hit_tokens"])
        return msgspec.structs.replace(now, extra=extra, **since)

    def flush_cache(self) -> bool:
        return self.scheduler.flush_cache()

    def check_peers(self) -> None:
        """Raise TPPeerLost if a tensor-parallel follower rank has died (no-op without TP)."""
        self.runner.check_peers()

    def close(self) -> None:
        """Stop what outlives this object on its own: the grammar process and fill threads
        (when started), the tensor-parallel follower ranks."""
        self._grammars.close()
        self.runner.close()

    def check_invariants(self) -> None:
        self.scheduler.memory.check_invariants(self.scheduler.running)
