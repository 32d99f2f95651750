"""Bounded retries and a circuit breaker for calls to a dependency that can be slow or down."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Literal, TypeVar

T = TypeVar("T")
BreakerState = Literal["closed", "open", "half_open"]


class CircuitOpenError(Exception):
    """The dependency is considered down; retry after ``retry_after_s``."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"circuit open; retry after {retry_after_s:.1f}s")
        self.retry_after_s = retry_after_s


class CircuitBreaker:
    """Opens after ``failure_threshold`` consecutive failures; fails fast while open.

    After ``reset_timeout_s`` one probe call is let through (half-open): its success closes the
    circuit, its failure opens it again for another ``reset_timeout_s``. Thread-safe.
    """

    def __init__(
        self,
        failure_threshold: int,
        reset_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = reset_timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> BreakerState:
        with self._lock:
            return self._state()

    def _state(self) -> BreakerState:
        if self._opened_at is None:
            return "closed"
        if self._clock() - self._opened_at >= self.reset_timeout_s:
            return "half_open"
        return "open"

    def before_call(self) -> None:
        """Raise CircuitOpenError unless a call may go ahead now."""
        with self._lock:
            state = self._state()
            if state == "closed":
                return
            if state == "half_open" and not self._probing:
                self._probing = True
                return
            assert self._opened_at is not None
            remaining = self.reset_timeout_s - (self._clock() - self._opened_at)
            raise CircuitOpenError(max(remaining, 0.0) or self.reset_timeout_s)

    def record_success(self) -> None:
        with self._lock:
            self._failures = 0
            self._opened_at = None
            self._probing = False

    def record_failure(self) -> None:
        with self._lock:
            self._failures += 1
            if self._probing or self._failures >= self.failure_threshold:
                self._opened_at = self._clock()
            self._probing = False


def call_with_retries(
    call: Callable[[], T],
    *,
    attempts: int,
    backoff_s: float,
    breaker: CircuitBreaker,
    is_transient: Callable[[BaseException], bool],
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run ``call`` through ``breaker``, retrying transient errors with exponential backoff.

    Errors that are not transient (a missing object, say) propagate at once and do not count
    against the dependency. When the attempts run out, the breaker records one failure.
    """
    breaker.before_call()
    for attempt in range(attempts):
        try:
            result = call()
        except Exception as error:
            if not is_transient(error):
                breaker.record_success()  # the dependency answered; the request was the problem
                raise
            if attempt == attempts - 1:
                breaker.record_failure()
                raise
            sleep(backoff_s * 2**attempt)
        else:
            breaker.record_success()
            return result
    raise AssertionError("unreachable: attempts >= 1")
