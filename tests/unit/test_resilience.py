"""Retries and the circuit breaker with a fake clock: no sleeping, no network."""

from __future__ import annotations

import pytest

from deployments.resilience import CircuitBreaker, CircuitOpenError, call_with_retries


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Flaky:
    """Fails with ``error`` the first ``failures`` calls, then returns "ok"."""

    def __init__(self, failures: int, error: Exception | None = None) -> None:
        self.failures = failures
        self.error = error or ConnectionError("down")
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "ok"


def call(operation: Flaky, breaker: CircuitBreaker, sleeps: list[float], attempts: int = 3) -> str:
    return call_with_retries(
        operation,
        attempts=attempts,
        backoff_s=0.1,
        breaker=breaker,
        is_transient=lambda error: not isinstance(error, FileNotFoundError),
        sleep=sleeps.append,
    )


def test_transient_errors_are_retried_with_exponential_backoff() -> None:
    breaker, sleeps = CircuitBreaker(3, 5.0, FakeClock()), []  # type: ignore[var-annotated]
    operation = Flaky(failures=2)
    assert call(operation, breaker, sleeps) == "ok"
    assert operation.calls == 3
    assert sleeps == [0.1, 0.2]
    assert breaker.state == "closed"


def test_permanent_errors_are_not_retried_and_do_not_trip_the_breaker() -> None:
    breaker, sleeps = CircuitBreaker(1, 5.0, FakeClock()), []  # type: ignore[var-annotated]
    operation = Flaky(failures=5, error=FileNotFoundError("gone"))
    with pytest.raises(FileNotFoundError):
        call(operation, breaker, sleeps)
    assert operation.calls == 1 and sleeps == []
    assert breaker.state == "closed"


def test_breaker_opens_fails_fast_then_probes_and_closes() -> None:
    clock = FakeClock()
    breaker, sleeps = CircuitBreaker(2, 5.0, clock), []  # type: ignore[var-annotated]
    down = Flaky(failures=100)
    for _ in range(2):
        with pytest.raises(ConnectionError):
            call(down, breaker, sleeps, attempts=1)
    assert breaker.state == "open"
    calls_before = down.calls
    with pytest.raises(CircuitOpenError) as raised:
        call(down, breaker, sleeps)
    assert down.calls == calls_before  # failed fast: the store was not called
    assert raised.value.retry_after_s == pytest.approx(5.0)

    clock.now += 5.0
    assert breaker.state == "half_open"
    with pytest.raises(ConnectionError):  # the probe fails: open again for another 5 s
        call(down, breaker, sleeps, attempts=1)
    assert breaker.state == "open"

    clock.now += 5.0
    assert call(Flaky(failures=0), breaker, sleeps) == "ok"  # the probe succeeds: closed
    assert breaker.state == "closed"


def test_only_one_probe_while_half_open() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(1, 1.0, clock)
    breaker.record_failure()
    clock.now += 1.0
    breaker.before_call()  # the probe is let through
    with pytest.raises(CircuitOpenError):
        breaker.before_call()  # a second caller while the probe runs fails fast
