"""The replicas' upkeep: release the slices of dead ``vslice run`` clients, delete orphan
claims, sweep old delete markers.

Every ``period_s`` seconds a replica reads the ``<prefix>-leases`` bucket and releases
(``Replica.release``) the pod of every lease its client stopped renewing
(``services.scheduler.core.upkeeping``); every ``claims_every_s`` seconds it removes the
claims of ``<prefix>-pods`` with no ledger entry behind them. Each replica does it: a
lease or claim is removed with a compare-and-set on the revision it saw, so of two
replicas only one acts on it, and a renewal or re-claim that came meanwhile wins over
both. For ``LATE_WINDOW_S`` after a lease ended, its pod is released again if it shows up
in the ledger: a dead client's schedule request may still commit within its deadline, and
a release that failed is retried so.

The claims are known from a watch (``ClaimsView``), not read whole each time: under churn
the bucket holds a tombstone per pod released in the last ``protocol.TOMBSTONE_TTL_S``
(tens of thousands), and reading them all every few seconds from each replica slowed the
whole bus down. Tombstones, refusal markers and removed keys' markers carry a per-message
TTL and nats-server removes them (``libshared.kvwrites``); every ``purge_every_s`` seconds
a sweep purges the markers written without one (by an older vslice, or a plain delete)
once older than ``marker_age_s``.

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
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api
from nats.js.kv import KeyValue

from libshared import kvreads, kvwrites, tasks, watching
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


@dataclass(frozen=True, slots=True)  # one per claim key: tens of thousands under churn
class Claimed:
    """One claim as a replica knows it: its ``revision``, when this replica first saw
    that revision (``since``, monotonic seconds), whether it is a release's
    ``tombstone``, and the per-message TTL it was written with (``ttl_s``, seconds; None
    when it has none: the server keeps it until it is removed)."""

    revision: int
    since: float
    tombstone: bool
    ttl_s: float | None = None


def _ttl_of(msg: Msg) -> float | None:
    """The per-message TTL of ``msg`` in seconds, or None (none, or not a number)."""
    raw = (msg.headers or {}).get(api.Header.MSG_TTL.value)
    try:
        ttl = float(raw.removesuffix("s")) if raw else None
    except ValueError:
        return None
    return ttl if ttl is not None and ttl > 0 else None


@dataclass
class ClaimsView:
    """The ``<prefix>-pods`` bucket followed by a watch: ``entries`` maps each claim key
    to its ``Claimed``, or is None while the watch is not following (not started yet,
    or starting again after ``WATCH_BACKOFF_S`` when it failed). A key the server
    removed by its TTL sends nothing: ``forget`` drops it."""

    kv: KeyValue
    entries: dict[str, Claimed] | None = None
    _task: asyncio.Task[None] | None = None

    WATCH_BACKOFF_S = 1.0

    def start(self) -> None:
        """Follow the bucket in the background until ``stop``."""
        self._task = asyncio.create_task(self._follow(), name="claims-view")

    async def stop(self) -> None:
        """Stop following."""
        if self._task is not None:
            await tasks.stop(self._task)
            self._task = None
        self.entries = None

    def forget(self, keys: list[str], seen: dict[str, Claimed]) -> None:
        """Drop each of ``keys`` still at the revision it had in ``seen``."""
        if self.entries is None:
            return
        for key in keys:
            now = self.entries.get(key)
            if now is not None and now.revision == seen[key].revision:
                del self.entries[key]

    async def _follow(self) -> None:
        while True:
            try:
                await self._follow_once()
            except (nats.errors.Error, TimeoutError) as exc:
                log.warning("claims not followed", extra={"error": str(exc)})
            self.entries = None  # the upkeep reads the bucket whole meanwhile
            await asyncio.sleep(self.WATCH_BACKOFF_S)

    async def _follow_once(self) -> None:
        entries: dict[str, Claimed] = {}
        # nats.py keeps a bucket's stream, subject prefix and JetStream context private
        pre = self.kv._pre
        loaded = asyncio.Event()

        async def on_entry(msg: Msg) -> None:
            meta, headers = msg.metadata, msg.headers or {}
            key = msg.subject[len(pre) :]
            if watching.is_removal(headers):
                entries.pop(key, None)
            else:
                kind = protocol.decode_claim(msg.data).kind
                entries[key] = Claimed(
                    revision=meta.sequence.stream,
                    since=time.monotonic(),
                    tombstone=kind is protocol.ClaimKind.RELEASED,
                    ttl_s=_ttl_of(msg),
                )
            if meta.num_pending == 0:
                loaded.set()

        sub: Subscription = await watching.subscribe_last(
            self.kv._js, self.kv._name, on_entry, loaded, idle_heartbeat=watching.HEARTBEAT_S
        )
        try:
            await loaded.wait()
            self.entries = entries
            await asyncio.Event().wait()  # until stop() cancels the task
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()


@dataclass
class Upkeep:
    """The upkeep of one replica (see the module docstring); ``released`` and
    ``orphans_deleted`` count what it did."""

    replica: Replica
    leases: KeyValue
    claims: KeyValue
    period_s: float = 2.0
    claims_every_s: float = 10.0
    purge_every_s: float = 600.0
    marker_age_s: float = 300.0
    orphan_grace_s: float = upkeeping.ORPHAN_GRACE_S
    tombstone_ttl_s: float = protocol.TOMBSTONE_TTL_S
    released: int = 0
    orphans_deleted: int = 0
    _lease_revs: upkeeping.Revisions = field(default_factory=upkeeping.Revisions)
    _claim_revs: upkeeping.Revisions = field(default_factory=upkeeping.Revisions)
    _ended: dict[str, float] = field(default_factory=dict)  # pod UID -> when its lease ended
    _task: asyncio.Task[None] | None = None
    _view: ClaimsView | None = None

    def start(self) -> None:
        """Follow the claims and run the upkeep in the background until ``stop``."""
        self._view = ClaimsView(self.claims)
        self._view.start()
        self._task = asyncio.create_task(self._loop(), name="upkeep")

    async def stop(self) -> None:
        """Stop the background upkeep."""
        if self._task is not None:
            await tasks.stop(self._task)
        if self._view is not None:
            await self._view.stop()
            self._view = None

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
                await kvwrites.purge(self.leases, key, last=entries[key].revision)
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
        """Remove every claim with no ledger entry behind it for ``orphan_grace_s`` (a
        tombstone: ``tombstone_ttl_s``), and release again every pod in a ledger behind a
        tombstone; returns the keys removed. A claim written with a per-message TTL (a
        tombstone, a refusal marker) is left to the server, and forgotten by the view
        once past it. None is removed while a node's ledger is quarantined. The claims
        are the view's (``ClaimsView``) while it follows the bucket, else read whole."""
        unknown = self.replica.unknown_ledgers()
        if unknown:
            # the pods of a quarantined ledger are unknown here: their claims are what
            # `vslice repair` rebuilds it from, so none is taken for an orphan meanwhile
            log.info("orphan claims kept: ledgers quarantined", extra={"nodes": sorted(unknown)})
            return []
        view = self._view.entries if self._view is not None else None
        claims = dict(view) if view is not None else await self._read_claims(now=now)
        revisions = upkeeping.Revisions(seen={k: (c.revision, c.since) for k, c in claims.items()})
        # a ledger waiting for its node's registration holds its pods' claims all the same
        ledgers = self.replica.ledgers(waiting=True)
        held = {pod_key(uid): uid for ledger in ledgers for uid in ledger.pods()}
        tombstones = {k for k, c in claims.items() if c.tombstone}
        for uid in upkeeping.tombstoned_pods(held, tombstones):
            await self._release(uid, why="placed behind its tombstone: released")
        ttls = {k: c.ttl_s for k, c in claims.items() if c.ttl_s is not None}
        if self._view is not None:
            self._view.forget(upkeeping.unchanged_for(ttls, revisions, now=now), claims)
        out = []
        orphans = upkeeping.orphan_claims(
            [k for k in claims if k not in ttls],
            held.keys(),
            revisions,
            now=now,
            grace_s=self.orphan_grace_s,
            tombstones=tombstones,
            tombstone_ttl_s=self.tombstone_ttl_s,
        )
        for key in orphans:
            try:
                await kvwrites.purge(self.claims, key, last=claims[key].revision)
            except nats.errors.Error:
                continue
            self.orphans_deleted += 1
            out.append(key)
            log.warning("orphan claim deleted", extra={"claim": key})
        return out

    async def _read_claims(self, *, now: float) -> dict[str, Claimed]:
        """The claims bucket read whole (its TTLs unknown: the slow way, while the view
        is not following)."""
        entries = await snapshot(self.claims)  # values: a tombstone is told by its value
        self._claim_revs.observe({k: e.revision or 0 for k, e in entries.items()}, now=now)
        seen = self._claim_revs.seen
        return {
            k: Claimed(
                revision=e.revision or 0,
                since=seen[k][1],
                tombstone=protocol.decode_claim(e.value or b"").kind is protocol.ClaimKind.RELEASED,
            )
            for k, e in entries.items()
        }

    async def purge_markers(self) -> None:
        """Purge the delete and purge markers older than ``marker_age_s`` from both
        buckets (those written with a TTL are the server's to remove, and go sooner)."""
        for kv in (self.claims, self.leases):
            # not kv.purge_deletes(): its watch stays subscribed (libshared.kvreads)
            await kvreads.purge_markers(kv, older_than_s=self.marker_age_s)
