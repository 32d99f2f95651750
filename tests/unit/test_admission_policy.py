"""Scheduling policy with hand-built states and a fake clock: no Ray, no sleeping."""

from __future__ import annotations

import pytest

from serve_app.admission_policy import RateLimiter, SchedulerCore, Ticket, admission_verdict, image_cost
from serve_app.config import SchedulerConfig, TierConfig, default_tiers

TIERS = default_tiers()
CONFIG = SchedulerConfig(defer_at_backlog=4, shed_at_backlog=8, max_backlog=20)


def ticket(
    name: str, tier: str = "paid", images: int = 1, variant: str = "v", is_job: bool = False
) -> Ticket:
    return Ticket(name, tenant=f"tenant-{name}", tier=tier, variant=variant, images=images, is_job=is_job)


def core(capacity: int = 1) -> SchedulerCore:
    return SchedulerCore(TIERS, CONFIG, {"v": capacity})


def test_cost_scales_with_pixels_steps_and_n() -> None:
    assert image_cost(512, 512, 30, 1) == pytest.approx(1.0)
    assert image_cost(1024, 1024, 30, 1) == pytest.approx(4.0)
    assert image_cost(512, 512, 15, 4) == pytest.approx(2.0)


def test_rate_limiter_refills_and_reports_headers() -> None:
    limiter = RateLimiter({"paid": TierConfig(requests_per_minute=2, cost_per_minute=10)})
    assert limiter.check("acme", "paid", 1.0, now=0).allowed
    second = limiter.check("acme", "paid", 1.0, now=0)
    assert second.allowed and second.requests.remaining == 0
    third = limiter.check("acme", "paid", 1.0, now=0)
    assert not third.allowed and third.retry_after_s == pytest.approx(30.0)
    assert third.headers()["x-ratelimit-limit-requests"] == "2"
    assert limiter.check("other", "paid", 1.0, now=0).allowed  # per tenant
    assert limiter.check("acme", "paid", 1.0, now=30).allowed  # one request refilled in 30 s


def test_cost_limit_and_a_denied_request_takes_nothing() -> None:
    limiter = RateLimiter({"paid": TierConfig(requests_per_minute=100, cost_per_minute=10)})
    assert limiter.check("acme", "paid", 8.0, now=0).allowed
    denied = limiter.check("acme", "paid", 5.0, now=0)
    assert not denied.allowed and denied.tokens.remaining == pytest.approx(2.0)
    assert limiter.check("acme", "paid", 2.0, now=0).allowed


@pytest.mark.parametrize(
    ("tier", "backlog", "wait", "is_job", "verdict"),
    [
        ("paid", 0, 0.0, False, "admit"),
        ("paid", 19, 1e9, False, "admit"),  # paid is shed only at the hard limit
        ("paid", 20, 0.0, False, "shed"),
        ("free", 3, 0.0, False, "admit"),
        ("free", 4, 0.0, False, "defer"),
        ("free", 8, 0.0, False, "shed"),
        ("free", 0, 1e9, False, "shed"),  # the predicted wait misses the deadline
        ("free", 0, 1e9, True, "admit"),  # an async job has no deadline to miss
    ],
)
def test_admission_verdicts(tier: str, backlog: int, wait: float, is_job: bool, verdict: str) -> None:
    assert admission_verdict(TIERS[tier], CONFIG, backlog, 1, wait, is_job)[0] == verdict


def test_paid_arriving_later_goes_first_but_free_ages_past_newer_paid() -> None:
    scheduler = core()
    assert [t.id for t in scheduler.grant(0.0)] == []
    scheduler.admit(ticket("blocker"), now=0.0)
    assert [t.id for t in scheduler.grant(0.0)] == ["blocker"]
    scheduler.admit(ticket("free-1", tier="free"), now=1.0)  # virtual start 1 + 10
    scheduler.admit(ticket("paid-1"), now=2.0)  # virtual start 2: ahead of free-1
    scheduler.admit(ticket("paid-late"), now=12.0)  # virtual start 12: behind free-1 (ageing)
    assert scheduler.queue_position("paid-1") == 0 and scheduler.queue_position("free-1") == 1
    order = []
    for now in (13.0, 14.0, 15.0):
        scheduler.release(order[-1] if order else "blocker", now, 1)
        (granted,) = scheduler.grant(now)
        order.append(granted.id)
    assert order == ["paid-1", "free-1", "paid-late"]


def test_deferred_free_work_waits_longer_at_peak() -> None:
    scheduler = core()
    for index in range(4):
        scheduler.admit(ticket(f"paid-{index}"), now=0.0)
    admission = scheduler.admit(ticket("free", tier="free"), now=0.0)
    assert admission.verdict == "defer"
    assert scheduler.queued["free"].order_key == pytest.approx(10.0 + 60.0)


def test_slots_bound_work_in_flight_and_the_head_is_never_skipped() -> None:
    scheduler = core(capacity=4)
    for name, images in (("a", 3), ("b", 2), ("c", 1)):
        scheduler.admit(ticket(name, images=images), now=0.0)
    assert [t.id for t in scheduler.grant(0.0)] == ["a"]  # b needs 2 of the 1 free slot; c waits behind it
    scheduler.release("a", 1.0, 3)
    assert [t.id for t in scheduler.grant(1.0)] == ["b", "c"]
    assert scheduler.snapshot()["v"]["in_flight"] == 3


def test_free_work_alone_may_use_every_slot() -> None:
    scheduler = core(capacity=8)
    for index in range(8):
        scheduler.admit(ticket(f"free-{index}", tier="free"), now=float(index))
        assert [t.id for t in scheduler.grant(float(index))] == [f"free-{index}"]
    assert scheduler.snapshot()["v"]["in_flight"] == 8


def sharing_core(capacity: int = 16) -> SchedulerCore:
    """Free may hold 2 of 16 slots while paid uses the variant."""
    tiers = {**TIERS, "free": TIERS["free"].model_copy(update={"contended_share": 0.125})}
    return SchedulerCore(tiers, CONFIG, {"v": capacity})


def test_while_paid_uses_the_variant_free_holds_its_share_and_queued_free_lets_paid_pass() -> None:
    scheduler = sharing_core()
    for index in range(3):
        scheduler.admit(ticket(f"free-{index}", tier="free"), now=0.0)
    scheduler.admit(ticket("paid-0"), now=0.0)
    assert [t.id for t in scheduler.grant(0.0)] == ["paid-0", "free-0", "free-1"]
    scheduler.release("paid-0", 30.0, 1)
    scheduler.admit(ticket("paid-1"), now=30.0)  # free-2 (virtual start 10) heads the queue...
    assert scheduler.queue_position("free-2") == 0
    assert [t.id for t in scheduler.grant(30.0)] == ["paid-1"]  # ...but its tier is at its share
    scheduler.release("free-0", 31.0, 1)
    assert [t.id for t in scheduler.grant(31.0)] == ["free-2"]  # below its share again


def test_the_contended_share_lapses_once_other_tiers_have_been_idle_for_the_window() -> None:
    scheduler = sharing_core()
    scheduler.admit(ticket("paid"), now=0.0)
    for index in range(4):
        scheduler.admit(ticket(f"free-{index}", tier="free"), now=0.0)
    assert len(scheduler.grant(0.0)) == 3  # paid + 2 free
    scheduler.release("paid", 1.0, 1)
    window = CONFIG.contention_window_s
    assert scheduler.grant(window) == []  # paid arrived (at 0) within the window
    assert [t.id for t in scheduler.grant(window + 0.1)] == ["free-2", "free-3"]


def test_free_runs_only_in_the_gaps_of_paid_work_unless_it_has_aged() -> None:
    scheduler = core(capacity=16)  # free's default share (0) is below one slot
    scheduler.admit(ticket("paid-0"), now=0.0)
    for index in range(3):
        scheduler.admit(ticket(f"free-{index}", tier="free"), now=0.0)  # virtual start 10
    assert [t.id for t in scheduler.grant(0.0)] == ["paid-0"]  # free waits while paid runs
    scheduler.release("paid-0", 1.0, 1)
    assert [t.id for t in scheduler.grant(1.0)] == ["free-0"]  # a gap: one free image at a time
    scheduler.admit(ticket("paid-1"), now=2.0)
    assert [t.id for t in scheduler.grant(2.0)] == ["paid-1"]
    scheduler.release("free-0", 3.0, 1)
    assert scheduler.grant(3.0) == []  # paid-1 still runs
    assert [t.id for t in scheduler.grant(10.0)] == ["free-1"]  # aged: runs beside paid work


def test_oversized_requests_still_run_alone() -> None:
    scheduler = core(capacity=2)
    scheduler.admit(ticket("big", images=10), now=0.0)
    assert [t.id for t in scheduler.grant(0.0)] == ["big"]


def test_cancel_removes_queued_work_and_shed_retry_after() -> None:
    scheduler = core()
    scheduler.admit(ticket("run"), now=0.0)
    scheduler.grant(0.0)
    scheduler.admit(ticket("gone"), now=0.0)
    assert scheduler.cancel("gone") and not scheduler.cancel("gone")
    assert scheduler.backlog("v") == 0
    for index in range(8):
        scheduler.admit(ticket(f"q{index}"), now=0.0)
    shed = scheduler.admit(ticket("free", tier="free"), now=0.0)
    assert shed.verdict == "shed" and shed.retry_after_s >= 1.0
    assert "free" not in scheduler.queued


def test_expired_leases_are_reported() -> None:
    scheduler = SchedulerCore(TIERS, SchedulerConfig(lease_s=10), {"v": 1})
    scheduler.admit(ticket("held"), now=0.0)
    scheduler.grant(0.0)
    assert scheduler.expired_leases(5.0) == []
    assert scheduler.expired_leases(11.0) == ["held"]
