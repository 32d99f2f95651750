"""The scheduler core follows the live replica count: nothing runs at zero, new slots are used."""

from __future__ import annotations

from serve_app.admission_policy import SchedulerCore, Ticket
from serve_app.config import SchedulerConfig, default_tiers


def ticket(name: str, images: int = 1) -> Ticket:
    return Ticket(name, tenant=f"tenant-{name}", tier="paid", variant="v", images=images)


def test_at_zero_replicas_work_stays_queued_with_its_position_and_runs_once_one_starts() -> None:
    core = SchedulerCore(default_tiers(), SchedulerConfig(), {"v": 0})
    for arrival, name in enumerate(("a", "b")):
        assert core.admit(ticket(name, images=2), now=arrival / 10).verdict == "admit"
    assert core.grant(now=1) == []
    assert (core.queue_position("a"), core.queue_position("b")) == (0, 1)
    core.set_capacity("v", 2)
    assert [granted.id for granted in core.grant(now=2)] == ["a"]
    core.set_capacity("v", 4)  # a second replica: its slots are used at once
    assert [granted.id for granted in core.grant(now=3)] == ["b"]


def test_a_replica_going_away_grants_nothing_more_until_the_running_work_drains() -> None:
    core = SchedulerCore(default_tiers(), SchedulerConfig(), {"v": 4})
    for name in ("a", "b", "c"):
        core.admit(ticket(name, images=2), now=0)
    assert [granted.id for granted in core.grant(now=1)] == ["a", "b"]
    core.set_capacity("v", 2)
    core.release("a", now=2, completed_images=2)
    assert core.grant(now=2) == []  # b still holds the only replica's 2 slots
    core.release("b", now=3, completed_images=2)
    assert [granted.id for granted in core.grant(now=3)] == ["c"]
