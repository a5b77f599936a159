"""No client waits forever, and none that left is paid for: a request's work is cancelled,
with the upstream calls in flight, when its client hangs up or the server's request
timeout passes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from starlette.requests import Request

from proxy.http import metrics
from proxy.http.errors import ApiError

# A client that hangs up is noticed from this long after its request arrived: answers that come
# sooner (most, on a fast upstream) never pay for a task watching the connection.
WATCH_DISCONNECT_AFTER_S = 0.05


async def until_disconnect(
    request: Request, work: Awaitable[Any], deadline_s: float | None = None
) -> Any:
    """Await `work` in this task; if the client disconnects first, or `deadline_s` (the
    server's request_timeout_s) passes, cancel it and its upstream calls: no client waits
    forever. A quick answer costs one timer; see Watch for the rest."""
    task = asyncio.current_task()
    assert task is not None
    watch = Watch(request, task, deadline_s)
    try:
        return await work
    except asyncio.CancelledError:
        if watch.why is None:
            raise
        task.uncancel()
        if watch.why == "gone":
            metrics.CLIENT_DISCONNECTS.inc()
            raise ApiError(499, "client disconnected", code="client_disconnected") from None
        raise ApiError(
            504,
            f"no answer within the proxy's request timeout ({deadline_s:g} s)",
            code="request_timeout",
        ) from None
    finally:
        watch.close()


class Watch:
    """Cancels a request's task when its client hangs up or its deadline passes.

    The connection is watched (a task reading the ASGI channel) only from
    WATCH_DISCONNECT_AFTER_S on, and the deadline is armed then too: most answers on a fast
    upstream come sooner and pay for one timer. A client gone earlier is noticed then."""

    __slots__ = ("deadline_at", "loop", "request", "task", "timer", "watcher", "why")

    def __init__(self, request: Request, task: asyncio.Task, deadline_s: float | None) -> None:
        self.request, self.task = request, task
        self.loop = asyncio.get_running_loop()
        now = self.loop.time()
        self.deadline_at = None if deadline_s is None else now + deadline_s
        self.why: str | None = None  # "gone" or "deadline", once the task was cancelled
        self.watcher: asyncio.Task | None = None
        first = (
            WATCH_DISCONNECT_AFTER_S
            if deadline_s is None
            else min(WATCH_DISCONNECT_AFTER_S, deadline_s)
        )
        self.timer = self.loop.call_at(now + first, self._start)

    def _start(self) -> None:
        self.watcher = self.loop.create_task(_disconnected(self.request))
        self.watcher.add_done_callback(self._hung_up)
        if self.deadline_at is not None:
            self.timer = self.loop.call_at(self.deadline_at, self._stop, "deadline")

    def _hung_up(self, watcher: asyncio.Task) -> None:
        if not watcher.cancelled() and watcher.exception() is None:
            self._stop("gone")

    def _stop(self, why: str) -> None:
        if self.why is None:
            self.why = why
            self.task.cancel()

    def close(self) -> None:
        self.timer.cancel()
        if self.watcher is not None:
            self.watcher.cancel()


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
