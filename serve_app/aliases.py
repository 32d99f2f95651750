"""Model aliases: one ``model`` name that splits traffic between variants by weight, per caller.

An alias maps variant names to positive weights, e.g. ``imagegen-1: {digits: 90, digits-fast: 10}``.
Which variant serves a request is a pure function of the alias and the caller, so a caller never
flips between variants while the weights stay the same:

1. The caller is the request's end user (``safety_identifier``, else ``user``), else its tenant.
2. ``sha256(alias, caller)`` is read as a number in [0, 1).
3. The variants, in name order, cover [0, 1) in slices as wide as their share of the weights;
   the slice the number falls in is the variant.

Changing the weights moves only the callers whose number falls in a slice that moved.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from pydantic import ConfigDict, TypeAdapter

AliasWeights = Mapping[str, float]
"""Variant name -> weight (positive; shares are weight / sum of the alias's weights)."""

HASH_SPAN = float(2**64)


def caller_identity(end_user: str | None, tenant: str) -> str:
    """Who a split is sticky for: the end user when the request names one, else the tenant."""
    return f"user:{end_user}" if end_user else f"tenant:{tenant}"


def caller_point(alias: str, caller: str) -> float:
    """A stable, uniformly spread number in [0, 1) for this alias and caller."""
    digest = hashlib.sha256(f"{alias}\x00{caller}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / HASH_SPAN


def choose_variant(alias: str, weights: AliasWeights, caller: str) -> str:
    """The variant of ``alias`` that serves ``caller``: the same one on every call."""
    total = sum(weights.values())
    point = caller_point(alias, caller) * total
    ordered = sorted(weights.items())
    upper = 0.0
    for variant, weight in ordered:
        upper += weight
        if point < upper:
            return variant
    return ordered[-1][0]  # the point is below the total; rounding alone can land here


def alias_errors(aliases: Mapping[str, AliasWeights], variants: Collection[str]) -> list[str]:
    """What is wrong with ``aliases`` given the configured variant names (empty when nothing is)."""
    errors = []
    for alias, weights in aliases.items():
        if alias in variants:
            errors.append(f"alias {alias!r} has the name of a variant; pick another name")
        if not weights:
            errors.append(f"alias {alias!r} names no variants; e.g. {{{sorted(variants)[0]}: 100}}")
        if unknown := sorted(set(weights) - set(variants)):
            errors.append(f"alias {alias!r}: unknown variants {unknown}; known: {sorted(variants)}")
        if not_positive := sorted(name for name, weight in weights.items() if not weight > 0):
            errors.append(f"alias {alias!r}: weights must be positive, got {not_positive}")
    return errors


@dataclass(frozen=True)
class ModelChoice:
    """What a request's ``model`` resolved to: the variant that runs it, and the alias, if any."""

    variant: str
    alias: str | None = None


def resolve_model(
    model: str, variants: Collection[str], aliases: Mapping[str, AliasWeights], caller: str
) -> ModelChoice | None:
    """A variant name stands for itself; an alias picks a variant for ``caller``; anything else: None."""
    if model in variants:
        return ModelChoice(model)
    if model in aliases:
        return ModelChoice(choose_variant(model, aliases[model], caller), alias=model)
    return None


@dataclass(frozen=True)
class Routing:
    """Which model names take new requests: every deployed variant but the ``retired`` ones, and
    the ``aliases``. It is the ingress's ``user_config``, so `serve deploy` changes it in place:
    a reweight restarts nothing, and retiring a variant stops new work for it while its queue drains.
    """

    __pydantic_config__ = ConfigDict(extra="forbid")  # read from a Serve config: a typo fails

    aliases: Mapping[str, AliasWeights] = field(default_factory=dict)
    retired: frozenset[str] = frozenset()

    @classmethod
    def from_user_config(cls, user_config: Mapping[str, object], variants: Collection[str]) -> Routing:
        """Read and check the ingress's ``user_config`` against the deployed ``variants``."""
        routing = TypeAdapter(cls).validate_python(user_config)
        errors = alias_errors(routing.aliases, routing.serving(variants))
        if unknown := sorted(routing.retired - set(variants)):
            errors.append(f"retired variants {unknown} are not deployed; deployed: {sorted(variants)}")
        if errors:
            raise ValueError("; ".join(errors))
        return routing

    def user_config(self) -> dict[str, object]:
        return {
            "aliases": {name: dict(weights) for name, weights in self.aliases.items()},
            "retired": sorted(self.retired),
        }

    def serving(self, variants: Collection[str]) -> list[str]:
        """The ``variants`` that take new requests, in their order."""
        return [name for name in variants if name not in self.retired]

    def retiring(self, variants: Collection[str]) -> Routing:
        """This routing with ``variants`` retired, and dropped from every alias (an alias left
        with none is dropped too)."""
        aliases = {
            alias: kept
            for alias, weights in self.aliases.items()
            if (kept := {name: weight for name, weight in weights.items() if name not in variants})
        }
        return Routing(aliases, self.retired | frozenset(variants))
