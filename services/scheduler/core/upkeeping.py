"""What the scheduler replicas clean up: stale leases and orphan claims. Pure.

Both decisions rest on one clock-free rule: a key is stale when its revision has not
changed for some seconds of this replica's own monotonic clock (``Revisions``). No
timestamp written by another machine is compared with this one's clock, so a client or
server whose clock is off neither keeps a dead lease alive nor ends a live one.

- A lease (``libshared.leases``) not renewed for its TTL: its ``vslice run`` client is
  gone, and its pod is released (``expired_leases``).
- A claim in ``<prefix>-pods`` with no ledger entry behind it for ``grace_s``: a replica
  died between claim and ledger commit, or a refusal marker written without a TTL
  outlived its window (``protocol.REFUSAL_TTL_S``); the claim is deleted
  (``orphan_claims``). Claims written with a per-message TTL are nats-server's to remove
  (``unchanged_for`` says when a replica may forget them). The grace is far
  longer than a claim lives before its commit (``claim_wait_s``), so a claim in flight is
  never taken for an orphan. A release's tombstone is kept ``tombstone_ttl_s`` instead
  (``protocol.TOMBSTONE_TTL_S``), and a pod found in a ledger behind a tombstone (a
  holder that committed late, then died before taking its slices back) is released
  again (``tombstoned_pods``).

The I/O (reading the buckets, releasing, deleting) is ``services.scheduler.adapters.upkeep``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass, field

from services.scheduler.core import protocol

ORPHAN_GRACE_S = protocol.REFUSAL_TTL_S


@dataclass
class Revisions:
    """When this replica first saw each key at its current revision: ``seen`` maps key to
    (revision, monotonic seconds)."""

    seen: dict[str, tuple[int, float]] = field(default_factory=dict)

    def observe(self, current: Mapping[str, int], *, now: float) -> None:
        """Record the keys' ``current`` revisions at ``now``; keys absent from
        ``current`` are forgotten, a changed revision starts its clock again."""
        self.seen = {
            key: self.seen[key] if self.seen.get(key, (None,))[0] == rev else (rev, now)
            for key, rev in current.items()
        }

    def unchanged_s(self, key: str, *, now: float) -> float:
        """Seconds ``key`` has kept its revision (0.0 for a key not seen)."""
        known = self.seen.get(key)
        return now - known[1] if known else 0.0


def unchanged_for(ttls_s: Mapping[str, float], revisions: Revisions, *, now: float) -> list[str]:
    """The keys of ``ttls_s`` (key -> TTL seconds) unchanged for at least their TTL,
    sorted: an ended lease; a claim written with a per-message TTL, which nats-server
    has removed by then (the replica first saw it after it was written)."""
    return sorted(k for k, ttl in ttls_s.items() if revisions.unchanged_s(k, now=now) >= ttl)


def expired_leases(ttls_s: Mapping[str, float], revisions: Revisions, *, now: float) -> list[str]:
    """The lease keys (of ``ttls_s``: key -> TTL seconds) unchanged for at least their
    TTL, sorted."""
    return unchanged_for(ttls_s, revisions, now=now)


def orphan_claims(
    claims: Iterable[str],
    held: Set[str],
    revisions: Revisions,
    *,
    now: float,
    grace_s: float = ORPHAN_GRACE_S,
    tombstones: Set[str] = frozenset(),
    tombstone_ttl_s: float = protocol.TOMBSTONE_TTL_S,
) -> list[str]:
    """The claim keys with no pod in ``held`` (the ledger's pods, as claim keys) that
    kept their revision for at least ``grace_s`` seconds (``tombstone_ttl_s`` for the
    keys in ``tombstones``), sorted."""
    return sorted(
        k
        for k in claims
        if k not in held
        and revisions.unchanged_s(k, now=now) >= (tombstone_ttl_s if k in tombstones else grace_s)
    )


def tombstoned_pods(held: Mapping[str, str], tombstones: Set[str]) -> list[str]:
    """The pod UIDs of ``held`` (claim key -> pod UID of every pod in a ledger) whose
    claim is a tombstone, sorted: each is released again."""
    return sorted(uid for key, uid in held.items() if key in tombstones)
