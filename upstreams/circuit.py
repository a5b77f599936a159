"""A per-backend circuit breaker: stop calling an upstream that keeps failing.

closed --(N consecutive failed calls)--> open --(cool-down)--> half-open
half-open --(the one trial call succeeds)--> closed; --(it fails)--> open again.

While open (and while the half-open trial is in flight) `allow()` is False and the backend
answers at once with error "circuit_open". Counts are per call (after the backend's own
retries), not per attempt. Single event loop, no locks: every method is synchronous.
"""

from __future__ import annotations

import time
from collections.abc import Callable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitBreaker:
    def __init__(
        self,
        failure_threshold: int = 5,
        cooldown_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if cooldown_s < 0:
            raise ValueError("cooldown_s must be >= 0")
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self.failures = 0  # consecutive failed calls
        self.opened_at: float | None = None
        self._trial = False  # the half-open trial call is in flight

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return CLOSED
        if self._trial or self._clock() - self.opened_at >= self.cooldown_s:
            return HALF_OPEN
        return OPEN

    def retry_in(self) -> float:
        """Seconds until the next trial call may go through (0 when closed)."""
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.opened_at + self.cooldown_s - self._clock())

    def allow(self) -> bool:
        """May a call go through now? In half-open state, only the first caller may (the
        trial): it must then report `success()`, `failure()` or `release()`."""
        if self.opened_at is None:
            return True
        if self._trial or self._clock() - self.opened_at < self.cooldown_s:
            return False
        self._trial = True
        return True

    def success(self) -> None:
        self.failures = 0
        self.opened_at = None
        self._trial = False

    def failure(self) -> None:
        self.failures += 1
        if self._trial or self.opened_at is not None or self.failures >= self.failure_threshold:
            self.opened_at = self._clock()
        self._trial = False

    def record(self, error: str | None, status: int | None) -> None:
        """The verdict of one finished call: answers and client errors (the upstream is up,
        the request was wrong) count as success; timeouts, 408, 429 and 5xx as failure."""
        if error is None or (
            status is not None and 400 <= status < 500 and status not in (408, 429)
        ):
            self.success()
        else:
            self.failure()

    def release(self) -> None:
        """The call ended without a verdict (cancelled, or a client error): free the trial."""
        self._trial = False
