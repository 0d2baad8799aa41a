"""logit_bias on the device: one sparse scatter-add over the batch (no grammar library needed)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from radixrt.engine.batch import host_to_device


def apply_logit_bias(logits: torch.Tensor, biases: Sequence[Sequence[tuple[int, float]]]) -> None:
    """logits[b, t] += bias for each row's (t, bias) pairs, in place, one scatter-add."""
    lengths = np.fromiter((len(b) for b in biases), dtype=np.int64, count=len(biases))
    if not lengths.any():
        return
    rows = np.repeat(np.arange(len(biases), dtype=np.int64), lengths)
    toks = np.fromiter((t for b in biases for t, _ in b), dtype=np.int64, count=int(lengths.sum()))
    vals = np.fromiter((v for b in biases for _, v in b), dtype=np.float32,
                       count=int(lengths.sum()))
    r = host_to_device(rows, torch.int64, logits.device)
    t = host_to_device(toks, torch.int64, logits.device)
    v = host_to_device(vals, logits.dtype, logits.device)
    logits.index_put_((r, t), v, accumulate=True)
