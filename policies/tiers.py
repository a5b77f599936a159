"""Tiers: several models called in parallel as one node of the cascade (an ensemble).

A tier's answer is the majority vote of its members' extracted answers (ties go to the
priciest member's answer, as in the Cascade-of-Ensembles baseline); its confidence is the
log of the vote fraction plus the mean confidence (log-probability) of the members that
voted for it, so that it reads like any model's confidence: a log-probability, 0 at best.
Calibration turns a trace's member columns into a tier column with this rule, and the
proxy applies the same rule to live calls, so a tier is an ordinary node to the policy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

TIER_PREFIX = "tier:"


def tier_name(members: Sequence[str]) -> str:
    """The node name of a tier, e.g. `tier:a+b+c` (members cheapest first)."""
    if len(members) < 2:
        raise ValueError(f"a tier needs at least two models, got {list(members)}")
    return TIER_PREFIX + "+".join(members)


def tier_members(name: str) -> list[str] | None:
    """The members of a tier node name; None for a plain model name."""
    if not name.startswith(TIER_PREFIX):
        return None
    return name.removeprefix(TIER_PREFIX).split("+")


def majority(extracted: Sequence[str | None]) -> list[int]:
    """The members voting for the majority answer, in tier order (empty when none answered).

    The one vote rule of every ensemble (tier nodes, the agreement baseline): members are in
    tier order, cheapest first; a member whose answer was not extracted votes for nothing;
    a tie between answers goes to the one whose priciest voter is pricier, and that voter
    (the last of the list) is the one whose answer is given."""
    votes: dict[str, list[int]] = {}
    for k, answer in enumerate(extracted):
        if answer is not None:
            votes.setdefault(answer, []).append(k)
    if not votes:
        return []
    return votes[max(votes, key=lambda a: (len(votes[a]), votes[a][-1]))]


def tier_vote(
    extracted: Sequence[str | None], confidence: Sequence[float | None]
) -> tuple[int | None, float | None]:
    """(index of the member whose answer the tier gives, the tier's confidence); (None,
    None) when no member answered. Members are in tier order, cheapest first."""
    voters = majority(extracted)
    if not voters:
        return None, None
    fraction = len(voters) / len(extracted)
    known = [c for k in voters if (c := confidence[k]) is not None and c == c]
    mean = sum(min(c, 0.0) for c in known) / len(known) if known else 0.0
    return voters[-1], math.log(fraction) + mean
