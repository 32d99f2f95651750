"""The end user of a request (``safety_identifier``, else ``user``): its own rate limit where a tier
sets one, and its column in the generation log."""

from __future__ import annotations

import dataclasses

from deployments.contracts import ImageRequest
from deployments.generation_log import SCHEMA, generation_rows
from serve_app.admission_policy import RateLimiter
from serve_app.config import TierConfig

REQUEST = ImageRequest(
    request_id="req-1",
    tenant="acme",
    variant="tiny-sd",
    kind="generate",
    prompt="a cat",
    negative_prompt=None,
    n=1,
    width=64,
    height=64,
    steps=4,
    guidance_scale=5.0,
    seed=10,
    safety_identifier="hash-1",
)


def test_an_end_user_limit_holds_each_end_user_within_the_tenant_limit() -> None:
    limiter = RateLimiter({"paid": TierConfig(requests_per_minute=10, end_user_requests_per_minute=2)})
    assert [limiter.check("acme", "paid", 0.1, 0.0, "alice").allowed for _ in range(3)] == [True, True, False]
    denied = limiter.check("acme", "paid", 0.1, 0.0, "alice")
    assert denied.retry_after_s > 0
    assert limiter.check("acme", "paid", 0.1, 0.0, "bob").allowed  # another end user has its own bucket
    assert limiter.check("other", "paid", 0.1, 0.0, "alice").allowed  # keyed within the tenant
    assert limiter.check("acme", "paid", 0.1, 0.0).allowed  # no end user: the tenant's limit only
    # Denied requests took nothing from the tenant: 2 alice + bob + anonymous = 4 of 10 taken.
    assert limiter.check("acme", "paid", 0.1, 0.0, "carol").requests.remaining == 5


def test_without_an_end_user_limit_end_users_share_the_tenant_limit() -> None:
    limiter = RateLimiter({"paid": TierConfig(requests_per_minute=2)})
    assert limiter.check("acme", "paid", 0.1, 0.0, "alice").allowed
    assert limiter.check("acme", "paid", 0.1, 0.0, "bob").allowed
    assert not limiter.check("acme", "paid", 0.1, 0.0, "carol").allowed


def test_the_generation_log_records_the_end_user() -> None:
    rows = generation_rows(REQUEST, None, include_prompt=False)
    assert rows[0]["safety_identifier"] == "hash-1"
    anonymous = generation_rows(
        dataclasses.replace(REQUEST, safety_identifier=None), None, include_prompt=False
    )
    assert anonymous[0]["safety_identifier"] is None
    assert SCHEMA.field("safety_identifier").nullable
