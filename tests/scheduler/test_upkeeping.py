"""The upkeep's decisions: a lease or claim is stale when its revision has not changed
for long enough on the deciding replica's own clock."""

from __future__ import annotations

import pytest

from services.scheduler.core import upkeeping


@pytest.mark.parametrize(
    ("observations", "now", "ttl_s", "expired"),
    [
        ([(0.0, {"a": 1})], 0.0, 3.0, []),  # just seen
        ([(0.0, {"a": 1}), (2.9, {"a": 1})], 2.9, 3.0, []),
        ([(0.0, {"a": 1}), (3.0, {"a": 1})], 3.0, 3.0, ["a"]),
        ([(0.0, {"a": 1}), (2.0, {"a": 2}), (4.0, {"a": 2})], 4.0, 3.0, []),  # renewed at 2
        ([(0.0, {"a": 1}), (2.0, {"a": 2}), (5.0, {"a": 2})], 5.0, 3.0, ["a"]),
        ([(0.0, {"a": 1, "b": 1}), (2.0, {"b": 1}), (9.0, {"a": 1, "b": 1})], 9.0, 3.0, ["b"]),
    ],
)
def test_a_lease_expires_once_its_revision_kept_still_for_its_ttl(
    observations: list[tuple[float, dict[str, int]]], now: float, ttl_s: float, expired: list[str]
) -> None:
    revisions = upkeeping.Revisions()
    for at, current in observations:
        revisions.observe(current, now=at)
    ttls = {k: ttl_s for k in observations[-1][1]}
    assert upkeeping.expired_leases(ttls, revisions, now=now) == expired


def test_a_claim_is_an_orphan_only_without_a_ledger_entry_and_after_the_grace() -> None:
    revisions = upkeeping.Revisions()
    revisions.observe({"held": 1, "orphan": 4, "young": 9}, now=0.0)
    revisions.observe({"held": 1, "orphan": 4, "young": 10}, now=50.0)
    claims = ["held", "orphan", "young"]
    assert upkeeping.orphan_claims(claims, {"held"}, revisions, now=59.0, grace_s=60) == []
    assert upkeeping.orphan_claims(claims, {"held"}, revisions, now=60.0, grace_s=60) == ["orphan"]
    assert upkeeping.orphan_claims(claims, {"held"}, revisions, now=200.0, grace_s=60) == [
        "orphan",
        "young",
    ]


@pytest.mark.parametrize(
    ("unchanged_s", "deleted"),
    [
        (59.0, []),
        (60.0, ["refused"]),  # a refusal marker goes after the orphans' grace
        (599.0, ["refused"]),
        (600.0, ["refused", "released"]),  # a tombstone only after its TTL
    ],
)
def test_a_tombstone_outlives_the_orphan_grace_until_its_own_ttl(
    unchanged_s: float, deleted: list[str]
) -> None:
    revisions = upkeeping.Revisions()
    revisions.observe({"refused": 1, "released": 2}, now=0.0)
    found = upkeeping.orphan_claims(
        ["refused", "released"],
        set(),
        revisions,
        now=unchanged_s,
        grace_s=60.0,
        tombstones={"released"},
        tombstone_ttl_s=600.0,
    )
    assert found == deleted


def test_only_pods_held_behind_a_tombstone_are_released_again() -> None:
    held = {"k-a": "a", "k-b": "b", "k-c": "c"}
    assert upkeeping.tombstoned_pods(held, {"k-c", "k-a", "k-gone"}) == ["a", "c"]
