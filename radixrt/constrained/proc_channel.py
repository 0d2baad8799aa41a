"""The grammar process's plumbing for ``proc_masks``: the shared-memory ring slots (memfds,
page-locked on CUDA), the process with its socket and relay thread, and what must be closed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from radixrt.constrained import grammar_proc as gp

logger = logging.getLogger(__name__)


class Shared:
    """One ring slot: [rows, words] int32 in a memfd mapped here (and in the process)."""

    def __init__(self, rows: int, words: int, cuda: bool) -> None:
        import mmap

        self.rows = rows
        nbytes = -(-rows * words * 4 // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages
        self.fd = os.memfd_create("radixrt-grammar-mask", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, nbytes)
        self._mm = mmap.mmap(self.fd, nbytes)
        self.host = torch.frombuffer(self._mm, dtype=torch.int32, count=rows * words
                                     ).view(rows, words)
        self.registered = False
        if cuda:  # page-locked, so the non-blocking copy is a real async DMA
            rc = torch.cuda.cudart().cudaHostRegister(self.host.data_ptr(), nbytes, 0)
            self.registered = int(rc) == 0
            if not self.registered:
                logger.warning("cudaHostRegister of the grammar mask failed (%s): its copy "
                               "to the device will be synchronous", rc)

    def close_fd(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def release(self) -> None:
        self.close_fd()
        if self.registered:
            torch.cuda.cudart().cudaHostUnregister(self.host.data_ptr())
            self.registered = False
        del self.host
        with contextlib.suppress(BufferError):  # a view is still held: unmapped when it goes
            self._mm.close()


class Channel:
    """The process, its socket, and the relay thread that sends ops to it in order."""

    def __init__(self, info_json: str, words: int, threads: int,
                 send_timeout_s: float = 10.0, nice: int = 0,
                 start_timeout_s: float = 120.0) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
        root = str(Path(__file__).resolve().parents[2])  # radixrt importable in the child
        env["PYTHONPATH"] = root + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") \
            else root
        # PR_SET_PDEATHSIG follows the thread that spawned it: only from the main thread.
        main = threading.current_thread() is threading.main_thread()
        # Written after each send: the process sleeps on it, not on the socket (grammar_proc.main).
        self.efd = os.eventfd(0, os.EFD_CLOEXEC)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "radixrt.constrained.grammar_proc", str(theirs.fileno()),
             "1" if main else "0", str(nice), str(self.efd)],
            pass_fds=(theirs.fileno(), self.efd), stdin=subprocess.DEVNULL, env=env)
        theirs.close()
        self.start_deadline = time.monotonic() + start_timeout_s
        self.sock = ours
        ours.settimeout(send_timeout_s)  # a send to a stuck process fails instead of hanging
        self.reader = gp.FrameReader(ours)
        self.ready = False
        self.broken: str | None = None
        self.acked = 0  # the newest ticket answered
        self.last: gp.Filled | None = None
        self.arrival_s = 0.0
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()  # one sender at a time, and the relay's queue count
        self._queued = 0  # items the relay has not sent yet
        self._closed = False
        self._relay = threading.Thread(target=self._send_loop, name="radixrt-grammar-relay",
                                       daemon=True)
        self._relay.start()
        data = info_json.encode()
        self._info_fd = os.memfd_create("radixrt-grammar-info", os.MFD_CLOEXEC)
        view = memoryview(data)
        while view:
            view = view[os.write(self._info_fd, view):]
        self.push([gp.Init(len(data), words, threads)], fds=[self._info_fd])

    def push(self, ops: list[gp.Op], job: Callable[[], gp.Op] | None = None,
             fds: Sequence[int] = ()) -> None:
        """Send ``ops`` (then ``job()``'s op: it may wait, on the relay thread) in order. With
        nothing queued for the relay, plain ops go out from the caller's thread: waking the
        relay would hand it the GIL, the very contention this process is there to avoid."""
        with self._lock:
            if job is None and self._queued == 0:
                self._send(ops, list(fds))
                return
            self._queued += 1
        self._queue.put((ops, job, list(fds)))

    def _send(self, ops: list[gp.Op], fds: list[int]) -> None:
        """One frame (under ``_lock``); a failure marks the channel broken."""
        if not ops or self.broken is not None:
            return
        try:
            data = gp.frame(gp.ENCODER.encode(ops))
            if fds:  # the fds ride on the first byte
                socket.send_fds(self.sock, [data[:1]], fds)
                data = data[1:]
            self.sock.sendall(data)  # bounded by the socket's timeout
            os.eventfd_write(self.efd, 1)
        except OSError as e:
            self.broken = self.broken or f"send: {e}"

    def _send_loop(self) -> None:
        try:
            while self._send_batch():
                pass
        except Exception as e:  # noqa: BLE001 - never silent: the client falls back on it
            self.broken = self.broken or f"relay: {type(e).__name__}: {e}"

    def _send_batch(self) -> bool:
        """Send everything queued as one frame (waiting for the first item); False: stop."""
        ops: list[gp.Op] = []
        fds: list[int] = []
        taken = 0
        item = self._queue.get()
        while item is not None:
            taken += 1
            more, job, f = item
            ops.extend(more)
            fds.extend(f)
            if job is not None and self.broken is None:
                try:
                    ops.append(job())  # an arrival: waits for the step's tokens
                except Exception as e:  # noqa: BLE001 - the client falls back on it
                    self.broken = f"relay: {type(e).__name__}: {e}"
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
        with self._lock:
            self._send(ops, fds)
            self._queued -= taken
        return item is not None

    def _read(self, timeout: float) -> bool:
        """Take in what the process sent (waiting up to ``timeout``); False on EOF / error."""
        try:
            if select.select([self.sock], [], [], timeout)[0]:
                self.reader.fill()
        except (EOFError, OSError, ValueError) as e:
            self.broken = self.broken or f"the grammar process is gone ({e})"
            return False
        while (raw := self.reader.next()) is not None:
            reply = gp.REPLY_DECODER.decode(raw)
            if isinstance(reply, gp.Ready):
                self.ready = True
            else:
                self.acked, self.last = reply.ticket, reply
                if reply.error:
                    self.broken = self.broken or f"grammar process: {reply.error}"
        return True

    def poll_ready(self) -> bool:
        if not self.ready and self.broken is None:
            self._read(0.0)
            if not self.ready and self.proc.poll() is not None:
                self.broken = f"the grammar process exited ({self.proc.returncode})"
            elif not self.ready and time.monotonic() > self.start_deadline:
                self.broken = "the grammar process did not start in time"
        return self.ready and self.broken is None

    def wait(self, ticket: int, timeout: float) -> bool:
        """Until ``ticket`` is answered; False (``broken`` says why) if it is not in time."""
        deadline = time.monotonic() + timeout
        while self.acked < ticket and self.broken is None:
            left = deadline - time.monotonic()
            if left <= 0:
                self.broken = f"no answer from the grammar process within {timeout:g} s"
            elif not self._read(min(left, 0.5)) or (self.acked < ticket and
                                                     self.proc.poll() is not None):
                self.broken = self.broken or \
                    f"the grammar process exited ({self.proc.returncode})"
        return self.broken is None

    def close(self) -> None:
        if self._closed:  # (an fd closed twice could be someone else's by then)
            return
        self._closed = True
        self._queue.put(None)
        self._relay.join(timeout=2.0)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # the process sees EOF and exits
        with contextlib.suppress(OSError):
            os.eventfd_write(self.efd, 1)  # (woken to see it)
        with contextlib.suppress(OSError):
            self.sock.close()
        for fd in (self.efd, self._info_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        try:
            self.proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5.0)


class Resources:
    """What must not outlive the client (closed once, by ``close`` or the GC / exit)."""

    def __init__(self) -> None:
        self.chan: Channel | None = None
        self.shared: list[Shared] = []

    def kill(self) -> None:
        if self.chan is not None:
            self.chan.broken = self.chan.broken or "closed"
            if self.chan.proc.poll() is None:
                self.chan.proc.kill()
            self.chan.close()

    def close(self) -> None:
        if self.chan is not None:
            self.chan.close()  # EOF: it exits on its own (killed if it does not in time)
        for s in self.shared:
            s.release()
        self.shared = []
