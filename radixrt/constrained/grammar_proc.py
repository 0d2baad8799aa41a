"""The grammar process: a copy of every constrained sequence's matcher, advanced by each
step's tokens and filling the next step's token bitmask into shared memory, in a process of
its own so its Python between xgrammar calls never waits for (or holds) the scheduler's GIL.

Run by ``proc_masks.ProcessMasks`` as ``python -m radixrt.constrained.grammar_proc FD MAIN
NICE EFD``: FD is its end of a socketpair, MAIN 1 if the parent's main thread spawned it, NICE
the niceness it takes (``RADIXRT_GRAMMAR_PROCESS_NICE``), EFD an eventfd the parent writes
after each send (see ``main``). Messages are msgspec structs (msgpack), framed by a 4-byte length;
the client sends lists of ops, applied in order:

    Init(size, words, threads)    tokenizer info (xgrammar JSON, ``size`` bytes in a memfd
                                  passed with the frame), mask width, fill threads
    Grammar(gid, data)            a compiled grammar (xgrammar JSON), by the client's id
    Buffer(slot, rows)            ring buffer ``slot``: a memfd of [rows, words] int32, passed
                                  with the frame (SCM_RIGHTS)
    Sync(ids, gids, pos, counts, tokens)  matcher ids[i] (made from grammar gids[i] if new)
                                  rolled back to pos[i] tokens, then accepting its counts[i]
                                  tokens of the flat ``tokens``
    Free(ids, gids)               matchers gone, and grammars none of them use
    Fill(ticket, slot, ids, rows) fill row rows[i] of ``slot`` from matcher ids[i] (all ones
                                  for one whose last token was a stop token: a fill sent
                                  before the client counted the step, ``start_ahead``)

and it answers each Fill with Filled(ticket, ...) (``error`` set if anything failed since the
last answer: the client stops using the process then). The mirrors are never the truth: the
client's matchers are, and each Sync says where a mirror must stand (``pos``), so a refused
or dropped token on either side is corrected by the next Sync. The process exits on EOF (the
client closed or died) and, on Linux, when its parent dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import mmap
import os
import select
import signal
import socket
import struct
import sys
import time
from typing import Any

import msgspec

_LEN = struct.Struct("<I")


class Init(msgspec.Struct, tag=True):
    size: int  # megabytes of JSON at 128k tokens: a file, not a socket write that would block
    words: int
    threads: int


class Grammar(msgspec.Struct, tag=True):
    gid: int
    data: str


class Buffer(msgspec.Struct, tag=True):
    slot: int
    rows: int


class Sync(msgspec.Struct, tag=True):
    ids: list[int]
    gids: list[int]
    pos: list[int]
    counts: list[int]
    tokens: list[int]


class Free(msgspec.Struct, tag=True):
    ids: list[int]
    gids: list[int] = msgspec.field(default_factory=list)  # grammars no matcher uses


class Fill(msgspec.Struct, tag=True):
    ticket: int
    slot: int
    ids: list[int]
    rows: list[int]


class Ready(msgspec.Struct, tag=True):
    pid: int


class Filled(msgspec.Struct, tag=True):
    ticket: int
    accept_s: float  # cumulative: the process's time in accepts, fills, and its CPU time
    fill_s: float
    cpu_s: float
    error: str = ""


Op = Init | Grammar | Buffer | Sync | Free | Fill
Reply = Ready | Filled
OPS_DECODER = msgspec.msgpack.Decoder(list[Op])
REPLY_DECODER = msgspec.msgpack.Decoder(Reply)
ENCODER = msgspec.msgpack.Encoder()


def frame(payload: bytes) -> bytes:
    return _LEN.pack(len(payload)) + payload


class FrameReader:
    """Length-prefixed frames from a stream socket; fds passed alongside are queued."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.fds: list[int] = []

    def next(self) -> bytes | None:
        """A complete frame already received, else None."""
        if len(self.buf) < 4:
            return None
        (n,) = _LEN.unpack_from(self.buf)
        if len(self.buf) < 4 + n:
            return None
        out = bytes(self.buf[4:4 + n])
        del self.buf[:4 + n]
        return out

    def fill(self, flags: int = 0) -> None:
        """One receive (blocking as the socket is set, unless ``flags`` say otherwise);
        EOFError when the peer is gone."""
        data, anc, _, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(16 * 4), flags)
        for level, kind, raw in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(raw) - len(raw) % 4
                self.fds.extend(struct.unpack(f"{usable // 4}i", raw[:usable]))
        if not data:
            raise EOFError("peer closed")
        self.buf += data


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


class Mirrors:
    """The process's state: grammars, matchers by id, the ring buffers."""

    def __init__(self) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        self.info: Any = None
        self.words = 0
        self.grammars: dict[int, Any] = {}
        self.matchers: dict[int, Any] = {}
        self.lens: dict[int, int] = {}
        self.stops: dict[int, frozenset[int]] = {}  # per grammar, its stop tokens
        self.stops_of: dict[int, frozenset[int]] = {}  # per matcher
        self.stopped: set[int] = set()  # matchers whose last token was a stop token
        self.buffers: dict[int, Any] = {}
        self.batch: Any = None
        self.accept_s = self.fill_s = 0.0
        self.cpu0 = time.process_time()  # its CPU (all threads) from Init on, not the imports
        self.error = ""

    def apply(self, op: Op, fds: list[int]) -> bytes | None:
        if isinstance(op, Sync):
            self._sync(op)
        elif isinstance(op, Fill):
            return self._fill(op)
        elif isinstance(op, Free):
            for i in op.ids:
                self.matchers.pop(i, None)
                self.lens.pop(i, None)
                self.stops_of.pop(i, None)
                self.stopped.discard(i)
            for g in op.gids:
                self.grammars.pop(g, None)
                self.stops.pop(g, None)
        elif isinstance(op, Grammar):
            cg = self.grammars[op.gid] = self.xgr.CompiledGrammar.deserialize_json(op.data,
                                                                                self.info)
            self.stops[op.gid] = frozenset(int(t) for t in
                                           self.xgr.GrammarMatcher(cg).stop_token_ids)
        elif isinstance(op, Buffer):
            self._buffer(op, fds.pop(0))
        elif isinstance(op, Init):
            fd = fds.pop(0)
            with mmap.mmap(fd, op.size, prot=mmap.PROT_READ) as mm:
                info = mm[:].decode()
            os.close(fd)
            self.info = self.xgr.TokenizerInfo.deserialize_json(info)
            self.words = op.words
            self.batch = self.xgr.BatchGrammarMatcher(max_threads=op.threads)
            self.cpu0 = time.process_time()
        return None

    def _buffer(self, op: Buffer, fd: int) -> None:
        import torch

        mm = mmap.mmap(fd, os.fstat(fd).st_size)
        os.close(fd)
        self.buffers[op.slot] = torch.frombuffer(mm, dtype=torch.int32, count=op.rows * self.words
                                                 ).view(op.rows, self.words)

    def _sync(self, op: Sync) -> None:
        from radixrt.constrained.batch import batch_accept

        t0 = time.perf_counter()
        todo: list[tuple[int, int, int]] = []  # (id, next token's index, end)
        at = 0
        for i, gid, pos, n in zip(op.ids, op.gids, op.pos, op.counts):
            m = self.matchers.get(i)
            if m is None:
                assert pos == 0, f"matcher {i} is new but synced from position {pos}"
                m = self.matchers[i] = self.xgr.GrammarMatcher(self.grammars[gid])
                self.lens[i] = 0
                self.stops_of[i] = self.stops[gid]
            have = self.lens[i]
            assert have >= pos, f"matcher {i} has {have} tokens, asked to stand at {pos}"
            if have > pos:
                m.rollback(have - pos)
                self.stopped.discard(i)  # a stop token is always the last one accepted
            self.lens[i] = pos
            if n:
                todo.append((i, at, at + n))
            at += n
        while todo:  # one batch accept per position (usually one)
            res = batch_accept([self.matchers[i] for i, _, _ in todo],
                               [op.tokens[k] for _, k, _ in todo])
            for j, (i, k, _) in enumerate(todo):
                if res is None or res[j]:
                    self.lens[i] += 1
                    if op.tokens[k] in self.stops_of[i]:
                        self.stopped.add(i)
            todo = [(i, k + 1, e) for j, (i, k, e) in enumerate(todo)
                    if (res is None or res[j]) and k + 1 < e]
        self.accept_s += time.perf_counter() - t0

    def _fill(self, op: Fill) -> bytes:
        t0 = time.perf_counter()
        if op.ids and not self.error:
            try:
                buf, ids, rows = self.buffers[op.slot], op.ids, op.rows
                if self.stopped:  # a fill ahead of the client's count: ended rows allow all
                    ended = [r for i, r in zip(ids, rows) if i in self.stopped]
                    if ended:
                        buf[ended] = -1
                        keep = [j for j, i in enumerate(ids) if i not in self.stopped]
                        ids, rows = [ids[j] for j in keep], [rows[j] for j in keep]
                self.batch.batch_fill_next_token_bitmask(
                    [self.matchers[i] for i in ids], buf, rows)
            except Exception as e:  # noqa: BLE001 - reported to the client, which falls back
                self.error = f"fill: {type(e).__name__}: {e}"
        self.fill_s += time.perf_counter() - t0
        out = ENCODER.encode(Filled(op.ticket, self.accept_s, self.fill_s,
                                    time.process_time() - self.cpu0, self.error))
        return frame(out)


def main(argv: list[str]) -> int:
    """argv: socket fd, "1" if spawned from the parent's main thread, niceness, eventfd."""
    if argv[1] == "1":
        _die_with_parent()
    if int(argv[2]) > 0:  # before any thread starts (they inherit it)
        os.nice(int(argv[2]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when this process ends
    sock = socket.socket(fileno=int(argv[0]))
    sock.setblocking(True)  # reads below are MSG_DONTWAIT: this process never waits on it
    efd = int(argv[3])
    parent = os.getppid()
    mirrors = Mirrors()
    reader = FrameReader(sock)
    sock.sendall(frame(ENCODER.encode(Ready(os.getpid()))))
    while True:
        raw = reader.next()
        if raw is None:
            try:
                reader.fill(socket.MSG_DONTWAIT)
            except BlockingIOError:
                # Wait on the eventfd the client writes after each send, not on the socket: a
                # unix-socket write wakes its reader "in sync", onto the writer's CPU, where
                # this process would preempt the scheduler thread that just sent it a step's
                # work; an eventfd wake-up goes to an idle CPU. The timeout notices a parent
                # that died without closing (its socket end kept alive elsewhere).
                if select.select([efd], [], [], 1.0)[0]:
                    os.eventfd_read(efd)
                elif os.getppid() != parent:
                    return 0
            except (EOFError, OSError):
                return 0
            continue
        out: list[bytes] = []
        for op in OPS_DECODER.decode(raw):
            try:
                reply = mirrors.apply(op, reader.fds)
            except Exception as e:  # noqa: BLE001 - a bad op: every later Fill says so
                mirrors.error = mirrors.error or f"{type(op).__name__}: {type(e).__name__}: {e}"
                reply = mirrors._fill(op) if isinstance(op, Fill) else None
            if reply is not None:
                out.append(reply)
        if out:
            sock.sendall(b"".join(out))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
