"""``vslice repair NODE``: rebuild a quarantined node's ledger.

A node whose ledger value does not decode, or whose ledger key was deleted, is
quarantined by every replica (``libshared.quarantines``): it takes no new pod and its
pods cannot be released, because what they hold is unknown. Its slices are rebuilt from
what the bus still knows:

- the ``<prefix>-alloc`` stream holds every ``Placement`` decided for the node and every
  ``Release`` of it (the replicas announce each commit there), for up to
  ``connecting.ALLOC_MAX_AGE_S`` (a day);
- the ``<prefix>-pods`` bucket holds the claim of every pod placed and not released (a
  release turns it into a tombstone before it frees the slices), so a placement whose
  release announcement was lost, but whose claim is gone or a tombstone, is left out;
- the other nodes' readable ledgers: a pod held on another node is left out.

The rebuilt ledger is written by compare-and-set on the revision of the bad value (or of
the delete marker), so a repair never overwrites a ledger changed meanwhile; the replicas
then take it in and lift the quarantine. Placements older than the stream's age limit
are not recovered: in Kubernetes the scheduler's reconcile adopts such pods back from
their ``hami.io/vgpu-devices-allocated`` annotations; ``vslice run`` pods are run again.

What it leaves to others: deciding what is bad (``libshared.quarantines``), taking the
repaired value in (the replicas' watch).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import msgspec
import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from libshared import connecting, events, kvreads, quarantines
from libshared.connecting import BusSettings
from libshared.errors import VsliceError
from libshared.ledgers import NodeLedger
from libshared.subjects import pod_key
from services.scheduler.core import protocol

HELD = protocol.ClaimKind.HELD


class RepairError(VsliceError):
    """The repair could not be done: ``node`` and why (the message says what to do)."""

    def __init__(self, node: str, why: str) -> None:
        self.node = node
        super().__init__(f"node {node!r}: {why}")


@dataclass(frozen=True)
class Repair:
    """What a repair did: the ``ledger`` written at ``revision`` (None: nothing written,
    the ledger was readable), the ``problem`` it fixed (the quarantine's detail), the pods
    it ``dropped`` (placed on the node, but released without an announcement or held on
    another node)."""

    node: str
    ledger: NodeLedger | None
    revision: int | None
    problem: str | None
    dropped: tuple[str, ...] = ()


def rebuilt_ledger(
    node: str,
    history: Iterable[events.Placement | events.Release],
    *,
    claimed: set[str],
    held_elsewhere: set[str],
) -> tuple[NodeLedger, tuple[str, ...]]:
    """``node``'s ledger from its allocation ``history`` (oldest first): every pod whose
    last ``Placement`` on ``node`` is not followed by a ``Release``, whose claim key is in
    ``claimed`` and that is not in ``held_elsewhere``. Returns the ledger and the UIDs of
    the pods left out for their claim or another node. Pure."""
    live: dict[str, events.Placement] = {}
    for event in history:
        if isinstance(event, events.Release):
            live.pop(event.pod_uid, None)
        elif event.node == node:
            live[event.pod_uid] = event
    kept = [p for uid, p in live.items() if pod_key(uid) in claimed and uid not in held_elsewhere]
    dropped = tuple(sorted(set(live) - {p.pod_uid for p in kept}))
    slices = tuple(s for p in kept for s in p.slices)
    charges = tuple(p.charge for p in kept if p.charge.cpu_milli or p.charge.memory_mib)
    return NodeLedger(node=node, slices=slices, charges=charges), dropped


async def _history(
    js: JetStreamContext, settings: BusSettings, node: str, *, timeout_s: float
) -> list[events.Placement | events.Release]:
    subjects = settings.subjects
    wanted = {subjects.alloc_decided(node), subjects.alloc_released(node)}
    info = await js.stream_info(
        subjects.alloc_stream, subjects_filter=f"{subjects.prefix}.alloc.{node}.*"
    )
    counts: Mapping[str, int] = info.state.subjects or {}
    if not any(counts.get(s, 0) for s in wanted):
        return []
    out: list[events.Placement | events.Release] = []
    done = asyncio.Event()

    async def on_msg(msg: Msg) -> None:
        if msg.subject in wanted:
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                out.append(events.ALLOC_EVENT.decode(msg.data))
        if msg.metadata.num_pending == 0:
            done.set()

    sub = await js.subscribe(
        f"{subjects.prefix}.alloc.{node}.*",
        stream=subjects.alloc_stream,
        cb=on_msg,
        ordered_consumer=True,
        deliver_policy=api.DeliverPolicy.ALL,
    )
    try:
        async with asyncio.timeout(timeout_s):
            await done.wait()
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
    return out


async def repair(settings: BusSettings, node: str, *, timeout_s: float = 30.0) -> Repair:
    """Rebuild ``node``'s ledger when it is unreadable or deleted (see the module
    docstring); a readable ledger is left as it is. ``settings``: an operator identity.

    Raises ``RepairError`` when the ledger changed while it was rebuilt, or the bus could
    not be read or written within ``timeout_s`` seconds."""
    try:
        async with asyncio.timeout(timeout_s):
            nc = await connecting.connect(settings, name="vslice-repair")
            try:
                return await _repair(nc.jetstream(), settings, node, timeout_s=timeout_s)
            finally:
                await nc.close()
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        raise RepairError(node, f"the bus could not be read or written: {exc!r}") from exc


async def _repair(
    js: JetStreamContext, settings: BusSettings, node: str, *, timeout_s: float
) -> Repair:
    bus = await connecting.ensure_bus(js, settings, create=False, wait_s=timeout_s)
    try:
        entry = await bus.ledger.get(node)
    except KeyNotFoundError as exc:
        deleted_at = quarantines.deletion_of(exc)
        if deleted_at is None:  # never written: nothing to rebuild
            return Repair(node=node, ledger=None, revision=None, problem=None)
        revision = deleted_at
        problem = quarantines.deleted(node, revision).detail
    else:
        revision = entry.revision or 0
        try:
            quarantines.read_ledger(node, entry.value or b"")
        except quarantines.Unreadable as bad:
            problem = bad.detail
        else:
            return Repair(node=node, ledger=None, revision=None, problem=None)
    # a pod still placed holds its claim; a release's tombstone or a refusal marker
    # (``services.scheduler.core.protocol``) holds none
    claims = await kvreads.latest(bus.pods)
    claimed = {k for k, e in claims.items() if protocol.decode_claim(e.value or b"").kind is HELD}
    elsewhere: set[str] = set()
    for key, other in (await kvreads.latest(bus.ledger)).items():
        if key != node:
            with contextlib.suppress(quarantines.Unreadable):
                elsewhere |= quarantines.read_ledger(key, other.value or b"").pods()
    history = await _history(js, settings, node, timeout_s=timeout_s)
    ledger, dropped = rebuilt_ledger(node, history, claimed=claimed, held_elsewhere=elsewhere)
    try:
        written = await bus.ledger.update(node, events.ENCODER.encode(ledger), last=revision)
    except KeyWrongLastSequenceError as exc:
        raise RepairError(node, "its ledger changed while it was rebuilt: run it again") from exc
    return Repair(node=node, ledger=ledger, revision=written, problem=problem, dropped=dropped)


def summary(done: Repair) -> str:
    """``vslice repair``'s words for a ``Repair``. Pure."""
    if done.ledger is None:
        return (
            f"{done.node}: its ledger is readable, nothing to repair (an unreadable"
            " registration is written again by the node's agent: restart it)"
        )
    pods = len(done.ledger.pods())
    lines = [
        f"{done.node} was quarantined: {done.problem}",
        f"rebuilt its ledger at revision {done.revision}: {pods} pod(s),"
        f" {len(done.ledger.slices)} slice(s); the replicas offer it again",
    ]
    if done.dropped:
        lines.append(f"left out (released, or held on another node): {', '.join(done.dropped)}")
    return "\n".join(lines)
