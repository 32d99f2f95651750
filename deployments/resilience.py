"""Bounded retries and a circuit breaker for calls to a dependency that can be slow or down."""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from collections.abc import Callable, Iterator
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
    circuit, its failure opens it again for another ``reset_timeout_s``, and an outcome that says
    nothing about the dependency (`release_probe`) lets the next call probe. Whoever is let
    through as the probe must report one of the three, or the circuit stays half-open with its
    probe spent; `guarded` does so for a block of work. Thread-safe.
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
        self._probe_number = 0
        # The probe a `guarded` block holds: calls inside it (and in threads it starts, which
        # inherit the context) go ahead instead of finding the probe taken. Numbered, so work
        # that inherited the context and outlives the block holds nothing afterwards.
        self._held_probe = contextvars.ContextVar(f"held_probe_{id(self)}", default=0)

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

    def before_call(self) -> bool:
        """Raise CircuitOpenError unless a call may go ahead now; True when it is the probe."""
        with self._lock:
            state = self._state()
            if state == "closed":
                return False
            if state == "half_open" and self._probing and self._held_probe.get() == self._probe_number:
                return False  # part of the work that holds the probe
            if state == "half_open" and not self._probing:
                self._probing = True
                self._probe_number += 1
                return True
            assert self._opened_at is not None
            remaining = self.reset_timeout_s - (self._clock() - self._opened_at)
            raise CircuitOpenError(max(remaining, 0.0) or self.reset_timeout_s)

    def record_success(self) -> None:
        with self._lock:
            self._failures = 0
            self._opened_at = None
            self._probing = False

    def release_probe(self) -> None:
        """The probe ended without telling whether the dependency works: let the next call probe."""
        with self._lock:
            self._probing = False

    @contextlib.contextmanager
    def guarded(self, is_failure: Callable[[BaseException], bool]) -> Iterator[None]:
        """Run a block of work as one call through the breaker, and always record how it ended.

        Success closes the circuit; an exception for which ``is_failure`` is true counts as a
        failure; any other ending (the client's mistake, a rate limit, a disconnect) gives the
        probe back unjudged. Calls through this breaker inside the block share its probe.
        """
        is_probe = self.before_call()
        token = self._held_probe.set(self._probe_number) if is_probe else None
        try:
            yield
        except BaseException as error:
            if is_failure(error):
                self.record_failure()
            elif is_probe:
                self.release_probe()
            raise
        else:
            self.record_success()
        finally:
            if token is not None:
                self._held_probe.reset(token)

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
