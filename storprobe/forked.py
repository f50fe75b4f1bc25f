"""An ordered map over forked worker processes, for scans that use every CPU.

The interpreter lock lets one thread run Python at a time, and probing is
Python, so threads cannot use a second CPU; processes can. ``ordered_map``
forks ``jobs - 1`` children that inherit the work list (nothing is sent to
them), deals the items out round-robin (item ``i`` to process ``i % jobs``,
this one included), and yields every result in item order. A child pickles its
results into its own pipe and runs ahead only as far as the pipe holds, so
memory stays bounded. A child that dies, or cannot be forked, leaves its items
to this process; a consumer that stops early (or an exception here) kills the
children.
Where ``os.fork`` does not exist, or while other threads run in this process,
everything runs in this process: a forked child has only the forking thread,
and a lock another thread held at the fork (in malloc, logging, an I/O buffer)
stays locked in the child for ever, so forking a threaded process can deadlock.
"""

from __future__ import annotations

import os
import pickle
import signal
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

S = TypeVar("S")
R = TypeVar("R")

#: A result frame: the byte length of the pickle that follows.
_FRAME = struct.Struct("<Q")
#: What each child's pipe is asked to hold (Linux ``F_SETPIPE_SZ``; a request
#: above the system's limit keeps the default), so children run ahead.
PIPE_BYTES = 1 << 20


def threads() -> int:
    """Threads of this process, those :mod:`threading` does not know of included
    (started through ``_thread`` or by C code: execnet's, a library's); where the
    kernel does not list them, the ones :mod:`threading` knows."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def usable_cpus() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def ordered_map(work: Callable[[S], R], items: Sequence[S], jobs: int) -> Iterator[R]:
    """``work(item)`` for every item, in item order, computed by ``jobs``
    processes (this one and ``jobs - 1`` forked children). Results of children
    must pickle; ``work`` must not raise (it runs where nobody could catch it).
    With other threads running, one process does all the work: see the
    module's note on forking threaded processes."""
    jobs = min(jobs, len(items)) if hasattr(os, "fork") and threads() == 1 else 1
    if jobs <= 1:
        yield from map(work, items)
        return
    children: list[_Child | None] = []  # None: its fork failed, its items are this process's
    try:
        children += (_Child.start(work, items, index, jobs) for index in range(1, jobs))
        for index, item in enumerate(items):
            child = children[index % jobs - 1] if index % jobs else None
            received = child.receive() if child is not None else _NOTHING
            yield work(item) if received is _NOTHING else received  # type: ignore[misc]
    finally:
        for child in children:
            if child is not None:
                child.stop()


_NOTHING = object()


class _Child:
    """One forked worker and the read end of its result pipe."""

    def __init__(self, pid: int, fd: int) -> None:
        self.pid, self.fd = pid, fd  # fd -1: stopped

    @classmethod
    def start(cls, work: Callable[[S], R], items: Sequence[S], index: int, jobs: int) -> _Child | None:
        """The child dealt items ``index``, ``index + jobs`` ...; None when no
        pipe or process can be had (descriptor or process limits)."""
        try:
            read_fd, write_fd = os.pipe()
        except OSError:
            return None
        _enlarge(write_fd)
        try:
            pid = os.fork()
        except OSError:
            os.close(read_fd)
            os.close(write_fd)
            return None
        if pid == 0:  # the child: never returns, never runs the parent's cleanup
            status = 1
            try:
                os.close(read_fd)
                signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C ends it quietly, as the parent
                for i in range(index, len(items), jobs):
                    data = pickle.dumps(work(items[i]), pickle.HIGHEST_PROTOCOL)
                    _write_all(write_fd, _FRAME.pack(len(data)) + data)
                status = 0
            finally:
                os._exit(status)
        os.close(write_fd)
        return cls(pid, read_fd)

    def receive(self) -> object:
        """The child's next result, or ``_NOTHING`` once it has died."""
        if self.fd >= 0:
            header = _read_exact(self.fd, _FRAME.size)
            data = _read_exact(self.fd, _FRAME.unpack(header)[0]) if header is not None else None
            if data is not None:
                return pickle.loads(data)
            self.stop()
        return _NOTHING

    def stop(self) -> None:
        """Kill the child unless it is done, reap it and close its pipe."""
        if self.fd < 0:
            return
        os.close(self.fd)
        self.fd = -1
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(self.pid, 0)


def _enlarge(fd: int) -> None:
    import fcntl  # POSIX, as fork is

    if hasattr(fcntl, "F_SETPIPE_SZ"):
        try:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        except OSError:
            pass  # above /proc/sys/fs/pipe-max-size: the default pipe still works


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exact(fd: int, length: int) -> bytes | None:
    """``length`` bytes from ``fd``, or None when it ends first."""
    chunks, missing = [], length
    while missing:
        chunk = os.read(fd, min(missing, PIPE_BYTES))
        if not chunk:
            return None
        chunks.append(chunk)
        missing -= len(chunk)
    return b"".join(chunks) if len(chunks) != 1 else chunks[0]
