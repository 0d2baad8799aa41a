"""The step plan rank 0 sends its followers, and how a follower turns it back into a step.

Everything rank 0 does to device state goes through here, in the order it did it, so a follower's
KV shard, page table and graphs stay identical in layout to rank 0's:

    control message (gloo, host int64)           device broadcasts (the step's own tensors)
    [op, T, B, N, is_decode, max_ext, max_seq,   long [T ids | T positions | T slots | N logits rows]
     n_entries, n_copies, G, M,                  ints [B+1 qo_indptr | B prefix | B seq | B rows]
     extend_lens[B], prefix_lens[B], rows[B],
     table idx/val[n_entries], copy src/dst[n_copies],
     cascade groups: indptr[G+1], members[M], shared_lens[G], rows[G]]   (G = -1: no groups)

The cascade groups (shared-prefix decode) ride along so every rank reads its KV-head shard of a
shared prefix once per group, as rank 0 does (a follower without them would take the per-request
path and rank 0 would wait for it at every all-reduce).

The page-table entries and page copies staged since the previous forward ride with the next one
(a follower applies them before running it, which is where rank 0's stream ran them). The device
tensors are broadcast as they are on rank 0's device, so token ids the overlap scheduler filled
from the previous step's draw reach followers without rank 0 ever reading them on the host.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from radixrt.cache.device_pages import DevicePageTable
from radixrt.cache.kv_pool import KVPool
from radixrt.distributed.group import TPGroup
from radixrt.engine.batch import ForwardBatch, host_to_device
from radixrt.engine.cascade_groups import CascadeGroups

OP_FORWARD = 1
OP_STOP = 2
_HEADER = 11


class RecordingPageTable(DevicePageTable):
    """Rank 0's device page table: every flushed entry is also kept for the next plan."""

    def __init__(self, *, num_rows: int, max_pages: int, page_size: int,
                 device: torch.device | str) -> None:
        super().__init__(num_rows=num_rows, max_pages=max_pages, page_size=page_size, device=device)
        self.sent_idx: list[int] = []
        self.sent_val: list[int] = []

    def flush(self) -> int:
        # Read before the base class clears them; it writes exactly these entries.
        idx, val = self._idx, self._val
        count = super().flush()
        if count:
            self.sent_idx.extend(idx)
            self.sent_val.extend(val)
        return count

    def take_entries(self) -> tuple[list[int], list[int]]:
        idx, val = self.sent_idx, self.sent_val
        self.sent_idx, self.sent_val = [], []
        return idx, val


class PlanSender:
    """Rank 0's side: queues page copies and sends one plan per forward."""

    def __init__(self, tp: TPGroup, table: RecordingPageTable) -> None:
        assert tp.rank == 0 and tp.size > 1, "only rank 0 of a real TP group sends plans"
        self.tp = tp
        self.table = table
        self._copy_src: list[int] = []
        self._copy_dst: list[int] = []
        self.plans_sent = 0
        # Raises TPPeerLost when a follower process has exited (set by the launcher).
        self.check_alive: Callable[[], None] = lambda: None

    def queue_copy(self, src: list[int], dst: list[int]) -> None:
        self._copy_src.extend(src)
        self._copy_dst.extend(dst)

    def send_forward(self, batch: ForwardBatch) -> None:
        self.check_alive()  # a dead follower would leave the collectives below hanging
        idx, val = self.table.take_entries()
        src, dst = self._copy_src, self._copy_dst
        self._copy_src, self._copy_dst = [], []
        t, b, n = batch.num_tokens, batch.batch_size, int(batch.logits_indices.shape[0])
        groups = batch.cascade
        grouping = [] if groups is None else [groups.indptr, groups.members, groups.shared_lens,
                                              groups.rows]
        header = [OP_FORWARD, t, b, n, int(batch.is_decode), batch.max_extend_len,
                  batch.max_seq_len, len(idx), len(src),
                  -1 if groups is None else groups.num_groups,
                  0 if groups is None else int(groups.members.shape[0])]
        msg = np.concatenate([
            np.asarray(header, dtype=np.int64), np.asarray(batch.extend_lens_cpu, dtype=np.int64),
            np.asarray(batch.prefix_lens_cpu, dtype=np.int64),
            np.asarray(batch.req_rows_cpu, dtype=np.int64), np.asarray(idx, dtype=np.int64),
            np.asarray(val, dtype=np.int64), np.asarray(src, dtype=np.int64),
            np.asarray(dst, dtype=np.int64), *(np.asarray(x, dtype=np.int64) for x in grouping),
        ])
        self.tp.send_plan(torch.from_numpy(msg))
        self.tp.broadcast_device(torch.cat([batch.input_ids, batch.positions, batch.out_slots,
                                            batch.logits_indices]))
        self.tp.broadcast_device(torch.cat([batch.qo_indptr, batch.prefix_lens, batch.seq_lens,
                                            batch.req_rows]))
        self.plans_sent += 1

    def send_stop(self) -> None:
        self.tp.send_plan(torch.tensor([OP_STOP] + [0] * (_HEADER - 1), dtype=torch.int64))


def receive_step(tp: TPGroup, table: DevicePageTable, pool: KVPool) -> ForwardBatch | None:
    """A follower's side of one plan: applies the page-table writes and page copies it carries
    and returns the step's batch (None: rank 0 said stop)."""
    msg = tp.recv_plan().numpy()
    op, t, b, n, is_decode, max_ext, max_seq, n_entries, n_copies, n_groups, n_members = (
        int(x) for x in msg[:_HEADER])
    if op == OP_STOP:
        return None
    assert op == OP_FORWARD, f"unknown plan op {op}"
    g = max(n_groups, 0)
    sizes = [b, b, b, n_entries, n_entries, n_copies, n_copies, g + 1 if n_groups >= 0 else 0,
             n_members, g, g]
    parts = np.split(msg[_HEADER:], np.cumsum(sizes)[:-1])
    assert parts[-1].shape[0] == g, "plan message length disagrees with its header"
    extend, prefix, rows, idx, val, src, dst = (p.tolist() for p in parts[:7])
    cascade = CascadeGroups(*parts[7:]) if n_groups >= 0 else None
    if n_entries:
        # Pinned + non_blocking (host_to_device): a pageable copy would wait for the step still
        # running on this rank, and every collective of the next step would wait for that.
        entries = host_to_device(np.stack([np.asarray(idx), np.asarray(val)]), torch.int64,
                                 table.device)
        table.table.view(-1).index_copy_(0, entries[0], entries[1].to(torch.int32))
    # One pair at a time: rank 0 ran its copies call by call, and a later call may read a page
    # an earlier one wrote (forks are rare; this costs nothing when there are none).
    for s_page, d_page in zip(src, dst):
        pool.copy_pages([s_page], [d_page])
    long = tp.broadcast_device(torch.empty(3 * t + n, dtype=torch.int64, device=table.device))
    ints = tp.broadcast_device(torch.empty(4 * b + 1, dtype=torch.int32, device=table.device))
    return ForwardBatch(
        input_ids=long[:t], positions=long[t : 2 * t], out_slots=long[2 * t : 3 * t],
        logits_indices=long[3 * t :], qo_indptr=ints[: b + 1], prefix_lens=ints[b + 1 : 2 * b + 1],
        seq_lens=ints[2 * b + 1 : 3 * b + 1], req_rows=ints[3 * b + 1 :],
        page_table=table.table, page_size=table.page_size, is_decode=bool(is_decode),
        max_extend_len=max_ext, max_seq_len=max_seq, extend_lens_cpu=extend,
        prefix_lens_cpu=prefix, req_rows_cpu=rows, cascade=cascade,
    )
