"""The replicas' upkeep: release the slices of dead ``vslice run`` clients, delete orphan
claims, purge old delete markers.

Every ``period_s`` seconds a replica reads the ``<prefix>-leases`` bucket and releases
(``Replica.release``) the pod of every lease its client stopped renewing
(``services.scheduler.core.upkeeping``); every ``claims_every_s`` seconds it deletes the
claims of ``<prefix>-pods`` with no ledger entry behind them; every ``purge_every_s``
seconds it purges the delete markers older than ``marker_age_s`` from both buckets (a
claim's delete marker is otherwise kept forever: about 142 bytes per pod ever scheduled).
Each replica does it: a lease or claim is deleted with a compare-and-set on the revision
it saw, so of two replicas only one acts on it, and a renewal or re-claim that came
meanwhile wins over both. For ``LATE_WINDOW_S`` after a lease ended, its pod is released
again if it shows up in the ledger: a dead client's schedule request may still commit
within its deadline, and a release that failed is retried so.

What it leaves to others: the decisions (``services.scheduler.core.upkeeping``), the
release itself (``services.scheduler.adapters.bus``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

import msgspec
import nats.errors
from nats.js.kv import KeyValue

from libshared import kvreads
from libshared import leases as leasing
from libshared.subjects import pod_key
from services.scheduler.adapters.bus import Replica
from services.scheduler.core import protocol, upkeeping

log = logging.getLogger("vslice.scheduler")
LATE_WINDOW_S = 60.0  # longer than any schedule request's deadline


async def snapshot(kv: KeyValue, *, headers_only: bool = False) -> dict[str, KeyValue.Entry]:
    """Every live key of ``kv`` with its latest entry (no values with ``headers_only``);
    its consumer does not outlive the read by more than ``kvreads.IDLE_S`` seconds (the
    one of a plain ``watchall`` stayed 5 minutes: hundreds through a churn soak)."""
    return await kvreads.latest(kv, meta_only=headers_only)


@dataclass
class Upkeep:
    """The upkeep of one replica (see the module docstring); ``released`` and
    ``orphans_deleted`` count what it did."""

    replica: Replica
    leases: KeyValue
    claims: KeyValue
    period_s: float = 2.0
    claims_every_s: float = 10.0
    purge_every_s: float = 60.0
    marker_age_s: float = 300.0
    orphan_grace_s: float = upkeeping.ORPHAN_GRACE_S
    tombstone_ttl_s: float = protocol.TOMBSTONE_TTL_S
    released: int = 0
    orphans_deleted: int = 0
    _lease_revs: upkeeping.Revisions = field(default_factory=upkeeping.Revisions)
    _claim_revs: upkeeping.Revisions = field(default_factory=upkeeping.Revisions)
    _ended: dict[str, float] = field(default_factory=dict)  # pod UID -> when its lease ended
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Run the upkeep in the background until ``stop``."""
        self._task = asyncio.create_task(self._loop(), name="upkeep")

    async def stop(self) -> None:
        """Stop the background upkeep."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        last_claims = last_purge = time.monotonic()
        while True:
            await asyncio.sleep(self.period_s)
            now = time.monotonic()
            try:
                await self.expire_leases(now=now)
                if now - last_claims >= self.claims_every_s:
                    last_claims = now
                    await self.delete_orphan_claims(now=now)
                if now - last_purge >= self.purge_every_s:
                    last_purge = now
                    await self.purge_markers()
            except (nats.errors.Error, TimeoutError) as exc:
                log.warning("upkeep skipped", extra={"error": repr(exc)})
            except Exception as exc:  # a bug here must not end the upkeep, nor the replica
                log.exception("upkeep failed", extra={"error": repr(exc)})

    async def expire_leases(self, *, now: float) -> list[str]:
        """End every stale lease and release its pod; returns the pod UIDs released now
        (the ones whose lease ended now, and ended ones placed or kept since)."""
        out = await self._release_late(now=now)
        entries = await snapshot(self.leases)
        self._lease_revs.observe({k: e.revision or 0 for k, e in entries.items()}, now=now)
        ttls, uids = {}, {}
        for key, entry in entries.items():
            try:
                lease = leasing.DECODER.decode(entry.value or b"")
            except (msgspec.DecodeError, msgspec.ValidationError):
                lease = leasing.Lease(pod_uid=key)  # unreadable: expires at the longest TTL
                ttls[key] = leasing.MAX_TTL_S
            else:
                ttls[key] = lease.bounded_ttl_s()
            uids[key] = lease.pod_uid
        for key in upkeeping.expired_leases(ttls, self._lease_revs, now=now):
            if self._held_back(uids[key]):
                continue  # ended once its node's ledger is readable again
            try:
                # the compare-and-set makes the lease ours to end: a renewal meanwhile, or
                # another replica that ended it first, wins
                await self.leases.delete(key, last=entries[key].revision)
            except nats.errors.Error:
                continue
            uid = uids[key]
            self._ended[uid] = now
            if await self._release(uid, why="lease expired: slice released"):
                out.append(uid)
        return sorted(out)

    def _held_back(self, pod_uid: str) -> bool:
        """True while ``pod_uid``'s release cannot be committed and must not be forgotten:
        its node's ledger is quarantined, or a ledger is quarantined and the view does not
        know where the pod is (it may be there). Such a lease stays until the repair, so
        its pod is released then."""
        unknown = self.replica.unknown_ledgers()
        if not unknown:
            return False
        node = self.replica.node_of(pod_uid)
        return node is None or node in unknown

    async def _release_late(self, *, now: float) -> list[str]:
        # A dead client's schedule request may still commit after its lease ended (within
        # the request's deadline), and a release may have failed: for LATE_WINDOW_S an
        # ended lease's pod found in the ledger is released again.
        out = []
        for uid, ended in sorted(self._ended.items()):
            if now - ended > LATE_WINDOW_S:
                del self._ended[uid]
            elif self.replica.node_of(uid) is not None and await self._release(
                uid, why="placed after its lease ended: released"
            ):
                out.append(uid)
        return out

    async def _release(self, uid: str, *, why: str) -> bool:
        try:
            ack = await self.replica.release(uid)
        except Exception as exc:  # Conflicts, TemporaryError: the next tick tries again
            log.warning("lease release failed", extra={"pod_uid": uid, "error": repr(exc)})
            return False
        self.released += 1
        log.info(why, extra={"pod_uid": uid, "node": ack.node or ""})
        return True

    async def delete_orphan_claims(self, *, now: float) -> list[str]:
        """Delete every claim with no ledger entry behind it for ``orphan_grace_s`` (a
        tombstone: ``tombstone_ttl_s``), and release again every pod in a ledger behind a
        tombstone; returns the keys deleted. None is deleted while a node's ledger is
        quarantined."""
        unknown = self.replica.unknown_ledgers()
        if unknown:
            # the pods of a quarantined ledger are unknown here: their claims are what
            # `vslice repair` rebuilds it from, so none is taken for an orphan meanwhile
            log.info("orphan claims kept: ledgers quarantined", extra={"nodes": sorted(unknown)})
            return []
        entries = await snapshot(self.claims)  # values: a tombstone is told by its value
        self._claim_revs.observe({k: e.revision or 0 for k, e in entries.items()}, now=now)
        # a ledger waiting for its node's registration holds its pods' claims all the same
        ledgers = self.replica.ledgers(waiting=True)
        held = {pod_key(uid): uid for ledger in ledgers for uid in ledger.pods()}
        tombstones = {
            k
            for k, e in entries.items()
            if protocol.decode_claim(e.value or b"").kind is protocol.ClaimKind.RELEASED
        }
        for uid in upkeeping.tombstoned_pods(held, tombstones):
            await self._release(uid, why="placed behind its tombstone: released")
        out = []
        orphans = upkeeping.orphan_claims(
            entries,
            held.keys(),
            self._claim_revs,
            now=now,
            grace_s=self.orphan_grace_s,
            tombstones=tombstones,
            tombstone_ttl_s=self.tombstone_ttl_s,
        )
        for key in orphans:
            try:
                await self.claims.delete(key, last=entries[key].revision)
            except nats.errors.Error:
                continue
            self.orphans_deleted += 1
            out.append(key)
            log.warning("orphan claim deleted", extra={"claim": key})
        return out

    async def purge_markers(self) -> None:
        """Purge the delete markers older than ``marker_age_s`` from both buckets."""
        for kv in (self.claims, self.leases):
            # not kv.purge_deletes(): its watch stays subscribed (libshared.kvreads)
            await kvreads.purge_markers(kv, older_than_s=self.marker_age_s)
