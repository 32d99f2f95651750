"""Scheduling policy as plain objects with an injected clock: rate limits, admission, order, slots.

Nothing here knows about Ray or HTTP, so every rule is tested with hand-built states
(tests/unit/test_admission_policy.py). `serve_app/scheduler.py` wraps it in a deployment.

The rules, in the order they apply to new work:
1. Rate limits per tenant: requests per minute and image cost per minute (token buckets).
2. Admission by backlog (queued images of the variant): over ``max_backlog`` everyone is shed;
   sheddable tiers (free) are also shed over ``shed_at_backlog`` or when their predicted wait
   exceeds their deadline; over ``defer_at_backlog`` tiers with a ``deferred_delay_s`` are deferred.
3. Order: by virtual start time, arrival + the tier's ``queue_delay_s`` (+ ``deferred_delay_s``
   when deferred). Paid work arriving later goes first, but free work ages: once its virtual
   start time has passed it is served before newer paid work, so it never starves.
4. Slots: a variant runs at most ``capacity`` images at once; the head of its queue gets a slot
   as soon as enough are free. While another tier uses the variant, a tier holds at most its
   ``contended_share`` of the slots, and its queued work waits without blocking other tiers: the
   rest is a latency reserve. Images of in-flight work share forward passes, so free work
   filling every slot would make each paid image wait for a full pass and then run in one. A
   share below one slot (free's default) keeps free work out of paid passes altogether: it runs
   one image at a time in the gaps between paid work, or once it has aged (`tier_slot_limit`).
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Literal

from deployments.contracts import ImageRequest
from serve_app.config import SchedulerConfig, TierConfig

REFERENCE_PIXELS = 512 * 512
REFERENCE_STEPS = 30
THROUGHPUT_WINDOW_S = 60.0
DEFAULT_IMAGES_PER_S = 1.0


def image_cost(width: int, height: int, steps: int, n: int) -> float:
    """Cost of a request: proportional to pixels x steps x n; one 512x512 image at 30 steps is 1."""
    return n * (width * height / REFERENCE_PIXELS) * (steps / REFERENCE_STEPS)


@dataclass(frozen=True)
class RateWindow:
    """One limit as OpenAI's x-ratelimit-* headers report it."""

    limit: float
    remaining: float
    reset_s: float


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    requests: RateWindow
    tokens: RateWindow
    retry_after_s: float = 0.0

    def headers(self) -> dict[str, str]:
        return {
            "x-ratelimit-limit-requests": str(int(self.requests.limit)),
            "x-ratelimit-remaining-requests": str(int(self.requests.remaining)),
            "x-ratelimit-reset-requests": f"{self.requests.reset_s:.3f}s",
            "x-ratelimit-limit-tokens": str(round(self.tokens.limit, 3)),
            "x-ratelimit-remaining-tokens": str(round(self.tokens.remaining, 3)),
            "x-ratelimit-reset-tokens": f"{self.tokens.reset_s:.3f}s",
        }


class TokenBucket:
    """``capacity`` tokens that refill evenly over a minute."""

    def __init__(self, capacity: float, now: float) -> None:
        self.capacity = capacity
        self.tokens = capacity
        self.updated = now

    def _refill(self, now: float) -> None:
        rate = self.capacity / 60.0
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * rate)
        self.updated = now

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` tokens are there (0 when they are now)."""
        self._refill(now)
        missing = min(amount, self.capacity) - self.tokens
        return max(missing, 0.0) / (self.capacity / 60.0)

    def take(self, amount: float) -> None:
        self.tokens -= min(amount, self.capacity)

    def window(self) -> RateWindow:
        reset_s = (self.capacity - self.tokens) / (self.capacity / 60.0)
        return RateWindow(self.capacity, max(self.tokens, 0.0), reset_s)


class RateLimiter:
    """Per-tenant request and cost buckets, and per end user where the tier sets a limit for them;
    a request takes from every bucket that applies or from none."""

    def __init__(self, tiers: dict[str, TierConfig]) -> None:
        self.tiers = tiers
        self._buckets: dict[str, tuple[TokenBucket, TokenBucket]] = {}
        self._end_user_buckets: dict[tuple[str, str], TokenBucket] = {}

    def check(
        self, tenant: str, tier: str, cost: float, now: float, end_user: str | None = None, take: bool = True
    ) -> RateDecision:
        """``end_user`` is the request's safety identifier (or ``user``), keyed within its tenant;
        with ``take=False`` the answer is the same and nothing is taken (a look ahead)."""
        config = self.tiers[tier]
        if tenant not in self._buckets:
            self._buckets[tenant] = (
                TokenBucket(config.requests_per_minute, now),
                TokenBucket(config.cost_per_minute, now),
            )
        requests, tokens = self._buckets[tenant]
        wait_s = max(requests.wait_for(1, now), tokens.wait_for(cost, now))
        end_user_requests = None
        if end_user and config.end_user_requests_per_minute is not None:
            end_user_requests = self._end_user_buckets.setdefault(
                (tenant, end_user), TokenBucket(config.end_user_requests_per_minute, now)
            )
            wait_s = max(wait_s, end_user_requests.wait_for(1, now))
        if wait_s > 0:
            return RateDecision(False, requests.window(), tokens.window(), retry_after_s=wait_s)
        if not take:
            return RateDecision(True, requests.window(), tokens.window())
        requests.take(1)
        tokens.take(cost)
        if end_user_requests is not None:
            end_user_requests.take(1)
        return RateDecision(True, requests.window(), tokens.window())


@dataclass
class Ticket:
    """A request or job waiting for (or holding) slots of one variant. Control data only."""

    id: str
    tenant: str
    tier: str
    variant: str
    images: int
    is_job: bool = False
    enqueued_at: float = 0.0
    order_key: float = 0.0
    deferred: bool = False
    granted_at: float | None = None


Verdict = Literal["admit", "defer", "shed"]


@dataclass(frozen=True)
class Admission:
    verdict: Verdict
    reason: str = ""
    retry_after_s: float = 0.0
    queue_position: int = 0
    eta_s: float = 0.0


def admission_verdict(
    tier: TierConfig,
    config: SchedulerConfig,
    backlog: int,
    images: int,
    predicted_wait_s: float,
    is_job: bool,
) -> tuple[Verdict, str]:
    """The pure rule: shed, defer or admit new work given the variant's current backlog."""
    if backlog + images > config.max_backlog:
        return "shed", "the service is at its hard backlog limit"
    if tier.sheddable and backlog >= config.shed_at_backlog:
        return "shed", "the service is at peak load; this tier is paused"
    if tier.sheddable and not is_job and predicted_wait_s > tier.max_wait_s:
        return (
            "shed",
            f"the predicted wait of {predicted_wait_s:.0f}s exceeds this tier's {tier.max_wait_s:.0f}s",
        )
    if tier.deferred_delay_s > 0 and backlog >= config.defer_at_backlog:
        return "defer", "deferred at peak"
    return "admit", ""


@dataclass
class VariantQueue:
    capacity: int
    heap: list[tuple[float, int, str]] = field(default_factory=list)
    in_use: int = 0
    in_use_by_tier: Counter[str] = field(default_factory=Counter)
    last_arrival: dict[str, float] = field(default_factory=dict)  # per tier
    completions: deque[tuple[float, int]] = field(default_factory=deque)  # (time, images)


Contention = Literal["none", "recent", "busy"]


def tier_slot_limit(tier: TierConfig, capacity: int, contention: Contention, aged: bool) -> int:
    """Slots a tier may hold given what the other tiers do on the variant.

    - ``none`` (no other tier has arrived within the window): every slot.
    - otherwise its contended share of the slots, when that is at least one;
    - a share below one slot means "only in the others' gaps": one image while no other tier has
      work queued or running (``recent``), none while one does (``busy``) unless this work has
      aged past its virtual start time, so it never starves.
    """
    if contention == "none":
        return capacity
    share = math.floor(tier.contended_share * capacity)
    if share:
        return share
    return 1 if contention == "recent" or aged else 0


class SchedulerCore:
    """Queues and slots of every variant. Single-threaded: the deployment calls it from one loop."""

    def __init__(
        self, tiers: dict[str, TierConfig], config: SchedulerConfig, capacity: dict[str, int]
    ) -> None:
        self.tiers = tiers
        self.config = config
        self.variants = {name: VariantQueue(slots) for name, slots in capacity.items()}
        self.queued: dict[str, Ticket] = {}
        self.running: dict[str, Ticket] = {}
        self._sequence = itertools.count()

    def backlog(self, variant: str, tier: str | None = None) -> int:
        """Images queued for ``variant`` (optionally of one tier)."""
        return sum(
            ticket.images
            for ticket in self.queued.values()
            if ticket.variant == variant and (tier is None or ticket.tier == tier)
        )

    def images_per_s(self, variant: str, now: float) -> float:
        """Recent completion rate, or a capacity-based guess before there is any history."""
        queue = self.variants[variant]
        while queue.completions and now - queue.completions[0][0] > THROUGHPUT_WINDOW_S:
            queue.completions.popleft()
        if len(queue.completions) < 2:
            return DEFAULT_IMAGES_PER_S
        span = max(now - queue.completions[0][0], 1.0)
        return max(sum(images for _, images in queue.completions) / span, 1e-3)

    def predicted_wait_s(self, variant: str, images_ahead: int, now: float) -> float:
        return images_ahead / self.images_per_s(variant, now)

    def preview(self, ticket: Ticket, now: float) -> Admission:
        """The verdict `admit` would give now, without queueing the ticket."""
        tier = self.tiers[ticket.tier]
        backlog = self.backlog(ticket.variant)
        queue = self.variants[ticket.variant]
        ahead = backlog + max(queue.in_use - queue.capacity, 0)
        predicted = self.predicted_wait_s(ticket.variant, ahead, now)
        verdict, reason = admission_verdict(
            tier, self.config, backlog, ticket.images, predicted, ticket.is_job
        )
        if verdict == "shed":
            drain_to = self.config.shed_at_backlog if tier.sheddable else self.config.max_backlog
            excess = max(backlog + ticket.images - drain_to, 1)
            retry_after = max(1.0, excess / self.images_per_s(ticket.variant, now))
            return Admission("shed", reason, retry_after_s=retry_after)
        return Admission(verdict, reason)

    def admit(self, ticket: Ticket, now: float) -> Admission:
        """Shed the ticket, or queue it (deferred or not) and say where it stands."""
        preview = self.preview(ticket, now)
        if preview.verdict == "shed":
            return preview
        tier = self.tiers[ticket.tier]
        queue = self.variants[ticket.variant]
        queue.last_arrival[ticket.tier] = now
        ticket.enqueued_at = now
        ticket.deferred = preview.verdict == "defer"
        ticket.order_key = now + tier.queue_delay_s + (tier.deferred_delay_s if ticket.deferred else 0.0)
        heapq.heappush(queue.heap, (ticket.order_key, next(self._sequence), ticket.id))
        self.queued[ticket.id] = ticket
        position = self.queue_position(ticket.id)
        eta = self.predicted_wait_s(ticket.variant, self._images_ahead(ticket), now)
        return Admission(preview.verdict, preview.reason, queue_position=position, eta_s=eta)

    def restore(self, ticket: Ticket) -> None:
        """Queue a recovered ticket with the order it had (no admission checks: it was accepted)."""
        heapq.heappush(
            self.variants[ticket.variant].heap, (ticket.order_key, next(self._sequence), ticket.id)
        )
        self.queued[ticket.id] = ticket

    def _images_ahead(self, ticket: Ticket) -> int:
        return sum(
            other.images
            for other in self.queued.values()
            if other.variant == ticket.variant
            and other.order_key <= ticket.order_key
            and other.id != ticket.id
        )

    def queue_position(self, ticket_id: str) -> int:
        """0 for the next ticket to run in its variant, 1 for the one after, ..."""
        ticket = self.queued.get(ticket_id)
        if ticket is None:
            return 0
        return sum(
            1
            for other in self.queued.values()
            if other.variant == ticket.variant and other.order_key < ticket.order_key
        )

    def contention(self, variant: str, tier: str, now: float, busy: set[str]) -> Contention:
        """What the other tiers do on ``variant``; ``busy`` are the tiers with work queued or running."""
        others = [other for other in self.tiers if other != tier]
        if any(other in busy for other in others):
            return "busy"
        last_arrival = self.variants[variant].last_arrival
        window = self.config.contention_window_s
        recent = any(now - last_arrival.get(other, -math.inf) <= window for other in others)
        return "recent" if recent else "none"

    def grant(self, now: float) -> list[Ticket]:
        """Tickets that get their slots now, in order. The head of a queue waits only for slots;
        work of a tier at its slot limit (`tier_slot_limit`) is passed over until it holds less."""
        granted = []
        for name, queue in self.variants.items():
            busy = {tier for tier, held in queue.in_use_by_tier.items() if held > 0}
            busy |= {ticket.tier for ticket in self.queued.values() if ticket.variant == name}
            contention = {tier: self.contention(name, tier, now, busy) for tier in self.tiers}
            passed_over = []
            while queue.heap:
                _, _, ticket_id = queue.heap[0]
                ticket = self.queued.get(ticket_id)
                if ticket is None:
                    heapq.heappop(queue.heap)  # cancelled while queued
                    continue
                if not queue.capacity or (queue.in_use and queue.in_use + ticket.images > queue.capacity):
                    break  # at zero replicas nothing runs; otherwise the head waits only for slots
                held = queue.in_use_by_tier[ticket.tier]
                limit = tier_slot_limit(
                    self.tiers[ticket.tier], queue.capacity, contention[ticket.tier], ticket.order_key <= now
                )
                if held + ticket.images > limit and (held or not limit):
                    passed_over.append(heapq.heappop(queue.heap))
                    continue
                heapq.heappop(queue.heap)
                del self.queued[ticket_id]
                queue.in_use += ticket.images
                queue.in_use_by_tier[ticket.tier] += ticket.images
                ticket.granted_at = now
                self.running[ticket_id] = ticket
                granted.append(ticket)
            for entry in passed_over:
                heapq.heappush(queue.heap, entry)
        return granted

    def set_capacity(self, variant: str, slots: int) -> None:
        """Follow the variant's live replicas. Work already running keeps its slots; below the
        new capacity, nothing more is granted until it drains."""
        self.variants[variant].capacity = slots

    def release(self, ticket_id: str, now: float, completed_images: int) -> bool:
        """Free a running ticket's slots; completed images feed the throughput estimate."""
        ticket = self.running.pop(ticket_id, None)
        if ticket is None:
            return False
        queue = self.variants[ticket.variant]
        queue.in_use -= ticket.images
        queue.in_use_by_tier[ticket.tier] -= ticket.images
        if completed_images:
            queue.completions.append((now, completed_images))
        return True

    def cancel(self, ticket_id: str) -> bool:
        """Drop a queued ticket (its heap entry is skipped later); False if it is not queued."""
        return self.queued.pop(ticket_id, None) is not None

    def expired_leases(self, now: float) -> list[str]:
        return [
            ticket.id
            for ticket in self.running.values()
            if ticket.granted_at is not None and now - ticket.granted_at > self.config.lease_s
        ]

    def snapshot(self) -> dict[str, dict[str, int]]:
        """Per variant: capacity, images in flight and queued images per tier."""
        state: dict[str, dict[str, int]] = {}
        for name, queue in self.variants.items():
            per_tier = {f"queued_{tier}": self.backlog(name, tier) for tier in self.tiers}
            state[name] = {"capacity": queue.capacity, "in_flight": queue.in_use, **per_tier}
        return state


@dataclass(frozen=True)
class WorkRequest:
    """What the ingress asks the scheduler for: slots for ``images`` images of ``variant``.

    The caller names the ticket, so it can give the slots back even when it never saw the grant.
    """

    tenant: str
    tier: str
    variant: str
    images: int
    cost: float
    end_user: str | None = None
    ticket_id: str = dataclasses.field(default_factory=lambda: f"tkt_{uuid.uuid4().hex}")


def work_request(request: ImageRequest, tier: str) -> WorkRequest:
    return WorkRequest(
        tenant=request.tenant,
        tier=tier,
        variant=request.variant,
        images=request.n,
        cost=image_cost(request.width, request.height, request.steps, request.n),
        end_user=request.safety_identifier,
    )
