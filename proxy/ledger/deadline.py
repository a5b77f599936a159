"""Database calls with a deadline, for the ledger writer.

Every database call of the writer (a batch, a replay chunk, a schema check) runs in a helper
thread and must answer within ``write_timeout_s``: a database that hangs (a frozen host, a
stalled network) is an outage exactly as one that refuses is. The helper thread of a call
past its deadline is abandoned with its connection (never reused; the pool's other
connections are dropped too) and the next call gets a new one. The abandoned call is not
cancelled: if it commits later, the replay of its batch finds its requests already there.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

MAX_ABANDONED = 4  # hung database threads still alive: no new attempt until fewer
WAIT_SLICE_S = 0.05  # how often the writer checks its queue while a call runs


class WriteTimeout(TimeoutError):
    """The database did not answer a write (or a connection, or a schema check) within the
    writer's ``write_timeout_s``: an outage, as a refused connection is."""


class _Job:
    """One piece of database work handed to a :class:`_DbThread`."""

    __slots__ = ("args", "done", "error", "fn", "result")

    def __init__(self, fn: Callable[..., Any], args: tuple) -> None:
        self.fn, self.args = fn, args
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class _DbThread:
    """A daemon thread that runs the writer's database work, one job at a time.

    The writer waits for a job at most ``write_timeout_s``. A thread whose job overran is
    abandoned: it ends when its job does (a frozen peer holds it until the connection times
    out or the peer wakes up), and the next job gets a new thread. So a hung connection
    neither holds the writer nor serves another batch."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.abandoned = False
        self.thread = threading.Thread(target=self._loop, name="cascade-ledger-db", daemon=True)
        self.thread.start()

    def run(self, fn: Callable[..., Any], *args: Any) -> _Job:
        job = _Job(fn, args)
        self._jobs.put(job)
        return job

    def stop(self) -> None:
        """End the thread once its current job, if any, is done."""
        self._jobs.put(None)

    def abandon(self) -> None:
        self.abandoned = True
        self.stop()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job.result = job.fn(*job.args)
            except BaseException as exc:  # handed to the writer, which decides
                job.error = exc
            finally:
                job.done.set()
            if self.abandoned:
                return


class DeadlineRunner:
    """Runs database calls in a :class:`_DbThread`, each waited for at most ``timeout_s``.

    ``refresh`` drops the pool's idle connections: it runs (in the database thread) before
    the first call after one was abandoned, since those connections may lead to the same
    hung peer. ``while_waiting`` runs every :data:`WAIT_SLICE_S` while a call is out, in the
    caller's thread: the writer keeps what is queued within its bounds meanwhile."""

    def __init__(
        self,
        timeout_s: float,
        refresh: Callable[[], None],
        while_waiting: Callable[[], None],
    ) -> None:
        self.timeout_s = timeout_s
        self._refresh = refresh
        self._while_waiting = while_waiting
        self._worker: _DbThread | None = None
        self._abandoned: list[_DbThread] = []  # overran their deadline, maybe still running
        self._stale = False  # a connection was abandoned: drop the pool's others

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in the database thread, waited for at most ``timeout_s``.

        Past that, the thread is abandoned (with its connection) and :class:`WriteTimeout`
        raised. An error of ``fn`` is raised here as it was raised there."""
        worker = self._worker
        if worker is None:
            self._abandoned = [t for t in self._abandoned if t.thread.is_alive()]
            if len(self._abandoned) >= MAX_ABANDONED:
                raise WriteTimeout(f"{len(self._abandoned)} earlier database calls are still hung")
            worker = self._worker = _DbThread()
        if self._stale:
            self._stale = False
            job = worker.run(self._fresh_call, fn, args)
        else:
            job = worker.run(fn, *args)
        deadline = time.monotonic() + self.timeout_s
        while not job.done.wait(max(0.0, min(WAIT_SLICE_S, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                worker.abandon()
                self._abandoned.append(worker)
                self._worker = None
                self._stale = True
                raise WriteTimeout(f"no answer within write_timeout_s={self.timeout_s:g} s")
            self._while_waiting()
        if job.error is not None:
            raise job.error
        return job.result

    def stop(self) -> None:
        """End the database thread once its current call, if any, is done."""
        if self._worker is not None:
            self._worker.stop()

    def _fresh_call(self, fn: Callable[..., Any], args: tuple) -> Any:
        self._refresh()
        return fn(*args)
