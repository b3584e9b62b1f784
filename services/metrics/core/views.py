"""The metrics service's view of the fleet: what the buckets and the usage reports say.

``FleetView`` holds the latest value of every key of ``<prefix>-nodes`` (``NodeDevices``)
and ``<prefix>-ledger`` (``NodeLedger``) and each node's latest ``NodeUsage`` report, plus
the scheduler replicas' ``Stats``. ``snapshot`` joins them into nodes -> devices -> slices
with allocated and used figures, the one shape both the Prometheus families
(``exporting``) and the dashboard (``dashboards``) are drawn from.

The ledger is the truth about slices: a usage line of a container that holds no slice on
that device in the ledger (a released slice whose last report is still the latest) is left
out, so a released slice disappears everywhere as soon as the ledger drops it. A node's
usage report older than ``usage_ttl_s`` is left out too (its node agent stopped
reporting).

Pure and synchronous: values arrive as bytes or decoded messages with their revision and
arrival time; nothing here reads the bus or a clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from libshared import bounds, events, quarantines
from libshared.devices import Device, NodeDevices
from libshared.errors import VsliceError
from libshared.ledgers import NodeLedger, Slice
from services.metrics.core import fragmentation

MIB = 1024 * 1024


class RejectedValue(VsliceError, ValueError):
    """A bucket value or usage report that cannot be taken in: ``source`` (``nodes``,
    ``ledger`` or ``usage``), ``key`` (node name or subject) and ``reason``."""

    def __init__(self, *, source: str, key: str, reason: str) -> None:
        self.source = source
        self.key = key
        self.reason = reason
        super().__init__(f"{source} {key!r}: {reason}")


@dataclass(frozen=True)
class SliceRow:
    """One ledger slice with its container's device order (``vdevice_index``: the position
    of the device among the container's devices, by device index, as the node agent lists
    them in ``NVIDIA_VISIBLE_DEVICES``) and its usage line when one is fresh."""

    slice: Slice
    vdevice_index: int
    usage: events.ContainerUsage | None = None


@dataclass(frozen=True)
class DeviceRow:
    """One device of a node: its registration (None when the ledger names a device the node
    did not register), its slices, allocated memory (MiB) and cores (percent), free share
    in milli-GPU (``fragmentation.free_milli``), the host's NVML reading when fresh, and the
    MIG instances the node agent realized on it (by placement start) when fresh."""

    node: str
    uuid: str
    index: int
    device: Device | None
    slices: tuple[SliceRow, ...]
    allocated_mib: int
    allocated_cores: int
    free_milli: int
    host: events.DeviceUsage | None = None
    migs: tuple[events.MigInstanceUsage, ...] = ()


@dataclass(frozen=True)
class NodeRow:
    """One node: its devices by index, whether it is registered, the age of its latest
    fresh usage report in seconds (None: none), and the processes that escaped their slice
    in that report."""

    node: str
    registered: bool
    devices: tuple[DeviceRow, ...]
    usage_age_s: float | None = None
    escapes: tuple[events.Escape, ...] = ()


@dataclass(frozen=True)
class Snapshot:
    """The joined fleet at one moment: nodes by name, the ledger stream sequence the view
    has taken in (``ledger_seq``) and the stream's last sequence when last asked
    (``ledger_last_seq``, 0 = not asked yet), and the quarantined nodes with their
    ``libshared.quarantines`` reason codes (a node may have two)."""

    nodes: tuple[NodeRow, ...]
    ledger_seq: int
    ledger_last_seq: int
    quarantined: tuple[tuple[str, str], ...] = ()  # (node, reason code), by node and reason

    @property
    def devices(self) -> list[DeviceRow]:
        """Every device row of every node, in node then index order."""
        return [d for n in self.nodes for d in n.devices]


@dataclass
class FleetView:
    """Latest bucket values, usage reports and replica stats (see the module docstring).

    ``usage``: node -> (report, arrival Unix time); ``stats``: replica name -> (``Stats``,
    arrival Unix time); ``ledger_seq``: highest ledger stream sequence taken in;
    ``quarantined``: node -> reason code -> detail, for each node whose registration or
    ledger value was rejected or whose ledger key was deleted (lifted by a good value).
    """

    nodes: dict[str, NodeDevices] = field(default_factory=dict)
    ledgers: dict[str, NodeLedger] = field(default_factory=dict)
    revisions: dict[str, int] = field(default_factory=dict)
    usage: dict[str, tuple[events.NodeUsage, float]] = field(default_factory=dict)
    stats: dict[str, tuple[events.Stats, float]] = field(default_factory=dict)
    ledger_seq: int = 0
    ledger_last_seq: int = 0
    quarantined: dict[str, dict[str, str]] = field(default_factory=dict)

    def _lift(self, key: str, reason: str) -> None:
        held = self.quarantined.get(key)
        if held is not None:
            held.pop(reason, None)
            if not held:
                del self.quarantined[key]

    def _reject(self, source: str, bad: quarantines.Unreadable) -> RejectedValue:
        self.quarantined.setdefault(bad.node, {})[bad.reason] = bad.detail
        return RejectedValue(source=source, key=bad.node, reason=bad.detail)

    # -- taking values in -------------------------------------------------------------------

    def put_node(self, key: str, value: bytes | None) -> None:
        """Take in the ``<prefix>-nodes`` value of ``key``; None or empty deletes the node.

        Raises ``RejectedValue`` for undecodable JSON, a value out of bounds or naming
        another node; the view keeps the node's previous value then, and quarantines it
        (``REGISTRATION_UNREADABLE``) until a good value or a deletion comes.
        """
        self._lift(key, quarantines.REGISTRATION_UNREADABLE)
        if not value:
            self.nodes.pop(key, None)
            self.usage.pop(key, None)  # a node gone takes its usage with it
            return
        try:
            reg = quarantines.read_registration(key, value)
        except quarantines.Unreadable as bad:
            raise self._reject("nodes", bad) from bad
        self.nodes[key] = reg

    def put_ledger(self, key: str, value: bytes | None, revision: int) -> None:
        """Take in the ``<prefix>-ledger`` value of ``key`` at stream sequence ``revision``;
        None or empty deletes the node's ledger and quarantines the node
        (``LEDGER_DELETED``). An older revision than the one held is ignored.

        Raises ``RejectedValue`` for undecodable JSON, a value out of bounds or naming
        another node; the view keeps the node's previous ledger then (its slices stay
        shown) and quarantines it (``LEDGER_UNREADABLE``) until a good value comes.
        """
        self.ledger_seq = max(self.ledger_seq, revision)
        if revision and revision < self.revisions.get(key, 0):
            return
        self._lift(key, quarantines.LEDGER_UNREADABLE)
        self._lift(key, quarantines.LEDGER_DELETED)
        if not value:
            self.ledgers.pop(key, None)
            self.revisions[key] = revision
            bad = quarantines.deleted(key, revision)
            self.quarantined.setdefault(key, {})[bad.reason] = bad.detail
            return
        try:
            ledger = quarantines.read_ledger(key, value)
        except quarantines.Unreadable as bad:
            raise self._reject("ledger", bad) from bad
        self.ledgers[key] = ledger
        self.revisions[key] = revision

    def put_usage(self, node: str, data: bytes, *, received_at: float) -> events.NodeUsage:
        """Take in a ``NodeUsage`` report published on ``<prefix>.usage.<node>``; returns it.

        Raises ``RejectedValue`` for undecodable JSON or a value over a bound of
        ``events.NodeUsage`` (a negative byte count, a utilization outside 0-100, more rows
        than a node holds: the reason names the field and value, ``bounds.describe``), a
        report naming another node than its subject, or a report of a node not registered in
        ``<prefix>-nodes`` (nothing of it is kept). A report older (by ``at``) than the
        one held is ignored.
        """
        try:
            report = events.NODE_USAGE.decode(data)
        except bounds.DECODE_ERRORS as exc:
            raise RejectedValue(
                source="usage", key=node, reason=bounds.describe(exc, data)
            ) from exc
        if report.node != node:
            raise RejectedValue(
                source="usage", key=node, reason=f"report names node {report.node!r}"
            )
        if node not in self.nodes:
            # kept, reports of nodes that never registered grew the view without bound
            # (2,000 of them: RSS 66 -> 102 MiB); a node registers before it reports
            raise RejectedValue(source="usage", key=node, reason="node is not registered")
        held = self.usage.get(node)
        if held is None or held[0].at <= report.at:
            self.usage[node] = (report, received_at)
        return report

    def forget_silent(self, *, now: float, ttl_s: float) -> list[str]:
        """Forget the usage reports and replica stats that arrived more than ``ttl_s``
        seconds before Unix time ``now`` (silent node agents and replicas: a report that
        old is never shown, and keeping it grew the view without bound). Returns the
        node and replica names forgotten, sorted."""
        gone = [n for n, (_, at) in self.usage.items() if now - at > ttl_s]
        for n in gone:
            del self.usage[n]
        quiet = [n for n, (_, at) in self.stats.items() if now - at > ttl_s]
        for n in quiet:
            del self.stats[n]
        return sorted(gone + quiet)

    def put_stats(self, stats: events.Stats, *, received_at: float) -> None:
        """Take in one scheduler replica's counters."""
        self.stats[stats.name] = (stats, received_at)

    def live_stats(self, *, now: float, ttl_s: float) -> list[events.Stats]:
        """Stats of the replicas that answered within ``ttl_s`` seconds of ``now``, by name."""
        return [s for name, (s, at) in sorted(self.stats.items()) if now - at <= ttl_s]

    # -- joining ------------------------------------------------------------------------------

    def snapshot(self, *, now: float, usage_ttl_s: float) -> Snapshot:
        """The joined fleet at Unix time ``now``, with usage reports at most ``usage_ttl_s``
        seconds old. Nodes are sorted by name, devices by index, slices by pod then
        container index."""
        rows = []
        for name in sorted(set(self.nodes) | set(self.ledgers)):
            fresh = self.usage.get(name)
            report = fresh[0] if fresh is not None and now - fresh[1] <= usage_ttl_s else None
            rows.append(
                _node_row(
                    name,
                    self.nodes.get(name),
                    self.ledgers.get(name),
                    report,
                    age_s=None if report is None or fresh is None else max(0.0, now - fresh[1]),
                )
            )
        return Snapshot(
            nodes=tuple(rows),
            ledger_seq=self.ledger_seq,
            ledger_last_seq=self.ledger_last_seq,
            quarantined=tuple(
                (node, reason)
                for node, held in sorted(self.quarantined.items())
                for reason in sorted(held)
            ),
        )


def _vdevice_indexes(slices: tuple[Slice, ...]) -> dict[tuple[str, str, str], int]:
    per: dict[tuple[str, str], list[Slice]] = {}
    for s in slices:
        per.setdefault((s.pod_uid, s.container), []).append(s)
    out = {}
    for (uid, container), held in per.items():
        for i, s in enumerate(sorted(held, key=lambda s: (s.device_index, s.uuid))):
            out[(uid, container, s.uuid)] = i
    return out


def _node_row(
    name: str,
    reg: NodeDevices | None,
    ledger: NodeLedger | None,
    report: events.NodeUsage | None,
    *,
    age_s: float | None,
) -> NodeRow:
    slices = ledger.slices if ledger is not None else ()
    vindex = _vdevice_indexes(slices)
    lines = {(c.pod_uid, c.container, c.uuid): c for c in (report.containers if report else ())}
    hosts = {d.uuid: d for d in (report.devices if report else ())}
    migs: dict[str, list[events.MigInstanceUsage]] = {}
    for m in report.migs if report else ():
        migs.setdefault(m.uuid, []).append(m)
    devices: dict[str, tuple[int, Device | None]] = {}
    for registered in reg.devices if reg is not None else ():
        devices[registered.uuid] = (registered.index, registered)
    for s in slices:
        devices.setdefault(s.uuid, (s.device_index, None))
    rows = []
    for uuid, (index, dev) in sorted(devices.items(), key=lambda kv: (kv[1][0], kv[0])):
        held = sorted(
            (s for s in slices if s.uuid == uuid), key=lambda s: (s.pod_uid, s.container_index)
        )
        mem = sum(s.memory_mib for s in held)
        cores = sum(s.cores_percent for s in held)
        rows.append(
            DeviceRow(
                node=name,
                uuid=uuid,
                index=index,
                device=dev,
                slices=tuple(
                    SliceRow(
                        slice=s,
                        vdevice_index=vindex[(s.pod_uid, s.container, s.uuid)],
                        usage=lines.get((s.pod_uid, s.container, s.uuid)),
                    )
                    for s in held
                ),
                allocated_mib=mem,
                allocated_cores=cores,
                free_milli=0
                if dev is None
                else fragmentation.free_milli(dev, slices=len(held), memory_mib=mem, cores=cores),
                host=hosts.get(uuid),
                migs=tuple(sorted(migs.get(uuid, ()), key=lambda m: m.start)),
            )
        )
    return NodeRow(
        node=name,
        registered=reg is not None,
        devices=tuple(rows),
        usage_age_s=age_s,
        escapes=report.escapes if report is not None else (),
    )
