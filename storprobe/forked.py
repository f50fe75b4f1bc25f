"""An ordered map over forked worker processes, for scans that use every CPU.

The interpreter lock lets one thread run Python at a time, and probing is
Python, so threads cannot use a second CPU; processes can. ``ordered_map``
forks ``jobs - 1`` children that inherit the work list (items are never sent:
a child is told an item's index), hands items out as the processes ask for
them, and yields every result in item order. Each child holds at most
:data:`QUEUED` items it has been given and not yet answered, and is given more
as it answers; this process works on the first item nobody holds, so a process
with more to do besides (this one writes every result) is given less. Items
are handed out at most :data:`WINDOW` per process ahead of the one yielded
next, so memory stays bounded whatever a slow item does. A child that dies, or
cannot be forked, leaves its items to this process; a consumer that stops early
(or an exception here) kills the children.
Where ``os.fork`` does not exist, or while other threads run in this process,
everything runs in this process: a forked child has only the forking thread,
and a lock another thread held at the fork (in malloc, logging, an I/O buffer)
stays locked in the child for ever, so forking a threaded process can deadlock.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

S = TypeVar("S")
R = TypeVar("R")

#: A result frame: the item's index and the byte length of the pickle that follows.
_FRAME = struct.Struct("<QQ")
#: An item handed to a child: its index.
_TASK = struct.Struct("<Q")
#: What each child's result pipe is asked to hold (Linux ``F_SETPIPE_SZ``; a
#: request above the system's limit keeps the default).
PIPE_BYTES = 1 << 20
#: Items a child holds at most: one it works on, and the next, so that it
#: never waits for this process to give it work.
QUEUED = 2
#: Items handed out, per process, ahead of the one yielded next.
WINDOW = 4


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
    children: list[_Child] = []
    try:
        children += filter(None, (_Child.start(work, items) for _ in range(1, jobs)))
        yield from _Dealer(work, items, children, jobs).results()
    finally:
        for child in children:
            child.stop()


class _Dealer:
    """Hands items to children as they answer, works on the rest here, and
    gives the results back in item order."""

    def __init__(self, work: Callable[[S], R], items: Sequence[S], children: list[_Child], jobs: int) -> None:
        self.work, self.items = work, items
        self.live = {child.answers: child for child in children}  # by the descriptor its answers come on
        self.poller = select.poll()  # not select.select: a descriptor over 1023 is fine
        for fd in self.live:
            self.poller.register(fd, select.POLLIN)
        self.done: dict[int, object] = {}  # index -> result, not yet yielded
        self.held: dict[int, _Child] = {}  # index -> the child working on it (a dead child's are dropped)
        self.next_free = 0  # items below it are handed out or done
        self.window = WINDOW * jobs

    def results(self) -> Iterator[R]:
        for index in range(len(self.items)):
            while index not in self.done:
                self._collect(block=False)
                self._deal(index)
                if index in self.done:
                    break
                if index not in self.held:  # nobody's yet, or a dead child's
                    self._here(index)
                elif self.next_free < min(len(self.items), index + self.window):
                    self._here(self.next_free)  # while a child works on the one needed
                else:
                    self._collect(block=True)  # for the child that holds it
            yield self.done.pop(index)  # type: ignore[misc]

    def _here(self, index: int) -> None:
        if index == self.next_free:
            self.next_free += 1
        self.done[index] = self.work(self.items[index])

    def _deal(self, index: int) -> None:
        """Give each child items until it holds :data:`QUEUED`, within the window."""
        end = min(len(self.items), index + self.window)
        for child in self.live.values():
            while child.queued < QUEUED and self.next_free < end:
                if not child.give(self.next_free):
                    break
                self.held[self.next_free] = child
                self.next_free += 1

    def _collect(self, block: bool) -> None:
        """Take the answers children have sent (with ``block``, wait for one)."""
        if not self.live:
            return
        for fd, _ in self.poller.poll(None if block else 0):
            child = self.live[fd]
            answer = child.receive()
            if answer is None:  # it died: what it held is done here
                self.poller.unregister(fd)
                del self.live[fd]
                for i in [i for i, holder in self.held.items() if holder is child]:
                    del self.held[i]
                continue
            index, result = answer
            del self.held[index]
            self.done[index] = result


class _Child:
    """One forked worker: the write end of its task pipe and the read end of its result pipe."""

    def __init__(self, pid: int, tasks: int, answers: int) -> None:
        self.pid, self.tasks, self.answers = pid, tasks, answers  # answers -1: stopped
        self.queued = 0

    @classmethod
    def start(cls, work: Callable[[S], R], items: Sequence[S]) -> _Child | None:
        """A child that works on the items it is given; None when no pipe or
        process can be had (descriptor or process limits)."""
        try:
            task_read, task_write = os.pipe()
        except OSError:
            return None
        try:
            answer_read, answer_write = os.pipe()
        except OSError:
            os.close(task_read)
            os.close(task_write)
            return None
        _enlarge(answer_write)
        try:
            pid = os.fork()
        except OSError:
            for fd in (task_read, task_write, answer_read, answer_write):
                os.close(fd)
            return None
        if pid == 0:  # the child: never returns, never runs the parent's cleanup
            status = 1
            try:
                os.close(task_write)
                os.close(answer_read)
                signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C ends it quietly, as the parent
                while (task := _read_exact(task_read, _TASK.size)) is not None:
                    (index,) = _TASK.unpack(task)
                    data = pickle.dumps(work(items[index]), pickle.HIGHEST_PROTOCOL)
                    _write_all(answer_write, _FRAME.pack(index, len(data)) + data)
                status = 0
            finally:
                os._exit(status)
        os.close(task_read)
        os.close(answer_write)
        return cls(pid, task_write, answer_read)

    def give(self, index: int) -> bool:
        """Hand the child item ``index``; False when it can no longer take one (it died)."""
        try:
            _write_all(self.tasks, _TASK.pack(index))
        except OSError:  # EPIPE: it has died; its answers end, and what it held is done elsewhere
            return False
        self.queued += 1
        return True

    def receive(self) -> tuple[int, object] | None:
        """The child's next answer (index, result), or None once it has died."""
        if self.answers >= 0:
            header = _read_exact(self.answers, _FRAME.size)
            if header is not None:
                index, length = _FRAME.unpack(header)
                data = _read_exact(self.answers, length)
                if data is not None:
                    self.queued -= 1
                    return index, pickle.loads(data)
        return None

    def stop(self) -> None:
        """Kill the child unless it is done, reap it and close its pipes."""
        if self.answers < 0:
            return
        os.close(self.tasks)
        os.close(self.answers)
        self.answers = -1
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
