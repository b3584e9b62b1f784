"""The scheduler's view of the fleet: devices and their usage, as arrays.

Pure state: built from ``NodeDevices`` and ``NodeLedger`` values, changed only by
``apply``/``release``/``set_ledger``. Usage per device (slices, memory MiB, cores percent)
and per node (CPU milli-cores, host memory MiB) is kept in numpy arrays so that a filter
over the whole openb fleet (1,213 nodes, 6,212 GPUs) is a handful of vector operations, and
every node carries a ``version`` that bumps on each change, so policies can cache what they
derive from a node and recompute only the nodes that changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from libshared import devices, migs, quarantines
from libshared.devices import NodeDevices
from libshared.events import Placement
from libshared.ledgers import NodeLedger, PodCharge, booked
from services.scheduler.core.migplacing import smallest_profile

MILLI = devices.MILLI  # one whole GPU in milli-GPU, the FGD paper's unit

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
_T = TypeVar("_T", bound=np.generic)


def _grown(old: npt.NDArray[_T], rows: int, fill: object) -> npt.NDArray[_T]:
    new = np.full((rows, *old.shape[1:]), fill, dtype=old.dtype)
    new[: old.shape[0]] = old
    return new


@dataclass
class Cluster:
    """Devices and usage of every node; ``max_devices`` pads the per-node device arrays.

    Arrays (N nodes, D = ``max_devices``): ``dev_valid`` (slot holds a device),
    ``dev_healthy``, ``dev_cordoned`` (no new slice: ``Device.cordoned``), ``dev_type``
    (index into ``types``), ``dev_mem``/``dev_mem_used`` (MiB),
    ``dev_cores``/``dev_cores_used`` (percent), ``dev_split``/``dev_used`` (slices),
    ``dev_numa``, ``dev_vendor`` (index into ``vendors``: the device's vendor,
    ``Device.vendor``; -1 for an empty slot), ``free_milli`` (what is left of the device
    in milli-GPU: the smaller of its free cores and free memory share; 0 when full,
    unhealthy, cordoned or out of split slots; -1 for an empty slot),
    ``cpu_total``/``cpu_used`` (milli-cores, total 0 = unchecked),
    ``mem_total``/``mem_used`` (MiB, 0 = unchecked), ``offered`` (the node takes new
    pods: False once withdrawn), ``version``; ``mig_nodes``: the indices of the nodes with
    a MIG-mode device (``libshared.migs``).

    A withdrawn node keeps its row, devices and ledger: the slices it holds stay booked
    until their pods are released, and registering it again offers it again.
    """

    max_devices: int = 8
    nodes: list[str] = field(default_factory=list)
    node_index: dict[str, int] = field(default_factory=dict)
    registrations: list[NodeDevices] = field(default_factory=list)
    ledgers: list[NodeLedger] = field(default_factory=list)
    pod_nodes: dict[str, int] = field(default_factory=dict)
    types: list[str] = field(default_factory=list)
    type_index: dict[str, int] = field(default_factory=dict)
    vendors: list[str] = field(default_factory=lambda: ["NVIDIA"])
    quarantined: dict[str, dict[str, str]] = field(default_factory=dict)
    mig_nodes: set[int] = field(default_factory=set)
    # per MIG node: (version, {slot: instances}) and (version, {(slot, MiB): fits})
    _mig_held: dict[int, tuple[int, dict[int, list[migs.Instance]]]] = field(
        default_factory=dict, repr=False
    )
    _mig_room: dict[int, tuple[int, dict[tuple[int, int], bool]]] = field(
        default_factory=dict, repr=False
    )

    def __post_init__(self) -> None:
        d = self.max_devices
        self.dev_valid = np.zeros((0, d), dtype=bool)
        self.dev_healthy = np.zeros((0, d), dtype=bool)
        self.dev_cordoned = np.zeros((0, d), dtype=bool)
        self.dev_type = np.zeros((0, d), dtype=np.int64)
        self.dev_mem = np.zeros((0, d), dtype=np.int64)
        self.dev_mem_used = np.zeros((0, d), dtype=np.int64)
        self.dev_cores = np.zeros((0, d), dtype=np.int64)
        self.dev_cores_used = np.zeros((0, d), dtype=np.int64)
        self.dev_split = np.zeros((0, d), dtype=np.int64)
        self.dev_used = np.zeros((0, d), dtype=np.int64)
        self.dev_numa = np.zeros((0, d), dtype=np.int64)
        self.dev_vendor = np.zeros((0, d), dtype=np.int64)
        self.free_milli = np.zeros((0, d), dtype=np.int64)
        self.cpu_total = np.zeros(0, dtype=np.int64)
        self.cpu_used = np.zeros(0, dtype=np.int64)
        self.mem_total = np.zeros(0, dtype=np.int64)
        self.mem_used = np.zeros(0, dtype=np.int64)
        self.version = np.zeros(0, dtype=np.int64)
        self.offered = np.zeros(0, dtype=bool)
        self.sound = np.zeros(0, dtype=bool)

    def _grow(self, rows: int) -> None:
        # Registration is rare; growing by one row at a time keeps the code plain
        # (``upsert_nodes`` grows once for many).
        if rows <= self.version.shape[0]:
            return
        self.dev_valid = _grown(self.dev_valid, rows, False)
        self.dev_healthy = _grown(self.dev_healthy, rows, False)
        self.dev_cordoned = _grown(self.dev_cordoned, rows, False)
        self.dev_type = _grown(self.dev_type, rows, -1)
        self.dev_mem = _grown(self.dev_mem, rows, 0)
        self.dev_mem_used = _grown(self.dev_mem_used, rows, 0)
        self.dev_cores = _grown(self.dev_cores, rows, 0)
        self.dev_cores_used = _grown(self.dev_cores_used, rows, 0)
        self.dev_split = _grown(self.dev_split, rows, 0)
        self.dev_used = _grown(self.dev_used, rows, 0)
        self.dev_numa = _grown(self.dev_numa, rows, 0)
        self.dev_vendor = _grown(self.dev_vendor, rows, -1)
        self.free_milli = _grown(self.free_milli, rows, -1)
        self.cpu_total = _grown(self.cpu_total, rows, 0)
        self.cpu_used = _grown(self.cpu_used, rows, 0)
        self.mem_total = _grown(self.mem_total, rows, 0)
        self.mem_used = _grown(self.mem_used, rows, 0)
        self.version = _grown(self.version, rows, 0)
        self.offered = _grown(self.offered, rows, False)
        self.sound = _grown(self.sound, rows, True)

    @property
    def size(self) -> int:
        """Number of nodes."""
        return len(self.nodes)

    def _type_id(self, name: str) -> int:
        tid = self.type_index.get(name)
        if tid is None:
            tid = self.type_index[name] = len(self.types)
            self.types.append(name)
        return tid

    def vendor_id(self, name: str) -> int:
        """The index of vendor ``name`` in ``vendors`` (added when new)."""
        if name not in self.vendors:
            self.vendors.append(name)
        return self.vendors.index(name)

    # -- registration and ledger ---------------------------------------------------------

    def upsert_node(self, reg: NodeDevices) -> int:
        """Add or replace a node's devices; its ledger is kept. Returns the node's index.

        Raises ``ValueError`` when the node has more devices than ``max_devices``.
        """
        if len(reg.devices) > self.max_devices:
            raise ValueError(
                f"node {reg.node!r} has {len(reg.devices)} devices, max {self.max_devices}"
            )
        n = self.node_index.get(reg.node)
        if n is None:
            n = len(self.nodes)
            self.nodes.append(reg.node)
            self.node_index[reg.node] = n
            self.registrations.append(reg)
            self.ledgers.append(NodeLedger(node=reg.node))
            self._grow(n + 1)
            self.sound[n] = reg.node not in self.quarantined
        else:
            self.registrations[n] = reg
        self.dev_valid[n] = False
        self.dev_cordoned[n] = False
        self.dev_type[n] = -1
        self.dev_vendor[n] = -1
        for slot, dev in enumerate(reg.devices):
            self.dev_vendor[n, slot] = self.vendor_id(dev.vendor)
            self.dev_valid[n, slot] = True
            self.dev_healthy[n, slot] = dev.healthy
            self.dev_cordoned[n, slot] = dev.cordoned
            self.dev_type[n, slot] = self._type_id(dev.type)
            self.dev_mem[n, slot] = dev.memory_mib
            self.dev_cores[n, slot] = dev.cores_percent
            self.dev_split[n, slot] = dev.split_count
            self.dev_numa[n, slot] = dev.numa
        if any(d.mode == "mig" and d.mig_profiles for d in reg.devices):
            self.mig_nodes.add(n)
        else:
            self.mig_nodes.discard(n)
        self.cpu_total[n] = reg.cpu_milli or 0
        self.mem_total[n] = reg.memory_mib or 0
        self.offered[n] = True
        self._recount(n)
        return n

    def mig_instances(self, n: int) -> dict[int, list[migs.Instance]]:
        """The GPU instances node ``n``'s ledger holds on each of its MIG-mode devices, by
        slot (computed once per node version; callers must not change the lists)."""
        cached = self._mig_held.get(n)
        version = int(self.version[n])
        if cached is not None and cached[0] == version:
            return cached[1]
        held: dict[int, list[migs.Instance]] = {}
        for slot, dev in enumerate(self.registrations[n].devices):
            geometry = migs.of_device(dev)
            if geometry is not None:
                held[slot] = migs.instances_on(self.ledgers[n].slices, dev.uuid, geometry)
        self._mig_held[n] = (version, held)
        return held

    def mig_room(self, n: int, slot: int, memory_mib: int) -> bool:
        """Whether node ``n``'s MIG-mode device ``slot`` has a free start for the smallest
        profile it offers holding ``memory_mib`` (remembered until the node changes)."""
        version = int(self.version[n])
        cached = self._mig_room.get(n)
        if cached is None or cached[0] != version:
            cached = self._mig_room[n] = (version, {})
        found = cached[1].get((slot, memory_mib))
        if found is None:
            geometry = migs.of_device(self.registrations[n].devices[slot])
            profile = None if geometry is None else smallest_profile(geometry, memory_mib)
            held = migs.occupied(self.mig_instances(n).get(slot, []))
            found = profile is not None and bool(migs.free_starts(profile, held))
            cached[1][(slot, memory_mib)] = found
        return found

    def upsert_nodes(self, regs: list[NodeDevices]) -> list[int]:
        """``upsert_node`` for many nodes, growing the arrays once (a fleet of N new nodes
        costs O(N) instead of O(N^2) copying). Returns their indices.

        Raises ``ValueError``, before changing anything, when a node has more devices than
        ``max_devices``.
        """
        for reg in regs:
            if len(reg.devices) > self.max_devices:
                raise ValueError(
                    f"node {reg.node!r} has {len(reg.devices)} devices, max {self.max_devices}"
                )
        new = {r.node for r in regs} - self.node_index.keys()
        self._grow(self.size + len(new))
        return [self.upsert_node(reg) for reg in regs]

    def withdraw_node(self, node: str) -> bool:
        """Stop offering ``node`` to new pods (its registration was deleted); its ledger
        stays, so its pods keep their slices until released. Returns False when the node
        is unknown or already withdrawn (nothing changes). Pure."""
        n = self.node_index.get(node)
        if n is None or not self.offered[n]:
            return False
        self.offered[n] = False
        self.version[n] += 1
        return True

    def quarantine(self, node: str, reason: str, detail: str) -> bool:
        """Quarantine ``node`` for ``reason`` (a ``libshared.quarantines`` code), ``detail``
        saying what was wrong: it takes no new pod until every quarantine of it is lifted.
        Returns True when the node was not quarantined for ``reason`` before. Pure."""
        held = self.quarantined.setdefault(node, {})
        new = reason not in held
        held[reason] = detail
        n = self.node_index.get(node)
        if n is not None and self.sound[n]:
            self.sound[n] = False
            self.version[n] += 1
        return new

    def lift(self, node: str, *reasons: str) -> bool:
        """Lift ``node``'s quarantines for ``reasons``; it is offered again once none is
        left (and it is registered and not withdrawn). Returns True when one was lifted.
        Pure."""
        held = self.quarantined.get(node)
        if not held or not any(r in held for r in reasons):
            return False
        for r in reasons:
            held.pop(r, None)
        if not held:
            del self.quarantined[node]
            n = self.node_index.get(node)
            if n is not None:
                self.sound[n] = True
                self.version[n] += 1
        return True

    def quarantine_reason(self, node: str) -> str | None:
        """The reason code ``node`` is quarantined for (the first of
        ``quarantines.REASONS`` it has), None when it is not."""
        held = self.quarantined.get(node)
        if not held:
            return None
        return next((r for r in quarantines.REASONS if r in held), next(iter(held)))

    def unknown_ledgers(self) -> set[str]:
        """The nodes whose ledger is quarantined (unreadable, or its key deleted): what
        their pods hold is not known to this view. Pure."""
        bad = (quarantines.LEDGER_UNREADABLE, quarantines.LEDGER_DELETED)
        return {n for n, held in self.quarantined.items() if any(r in held for r in bad)}

    def set_ledger(self, ledger: NodeLedger) -> None:
        """Replace a registered node's ledger and recompute its usage.

        Raises ``KeyError`` for a node that never registered.
        """
        n = self.node_index[ledger.node]
        for uid in self.ledgers[n].pods():
            if self.pod_nodes.get(uid) == n:
                del self.pod_nodes[uid]
        self.ledgers[n] = ledger
        for uid in ledger.pods():
            self.pod_nodes[uid] = n
        self._recount(n)

    def _recount(self, n: int) -> None:
        reg, ledger = self.registrations[n], self.ledgers[n]
        slot_of = {d.uuid: slot for slot, d in enumerate(reg.devices)}
        mem = [0] * self.max_devices
        cores = [0] * self.max_devices
        used = [0] * self.max_devices
        for uuid, (m, k, u) in booked(ledger.slices).items():
            slot = slot_of.get(uuid)
            if slot is None:
                continue  # a slice on a device the node no longer reports: kept in the ledger
            mem[slot] += m
            cores[slot] += k
            used[slot] += u
        self.dev_mem_used[n] = mem
        self.dev_cores_used[n] = cores
        self.dev_used[n] = used
        self.cpu_used[n] = sum(c.cpu_milli for c in ledger.charges)
        self.mem_used[n] = sum(c.memory_mib for c in ledger.charges)
        self._refresh(n)

    def _refresh(self, n: int) -> None:
        row = [-1] * self.max_devices
        for slot in range(len(self.registrations[n].devices)):
            row[slot] = self.device_free_milli(n, slot)
        self.free_milli[n] = row
        self.version[n] += 1

    def device_free_milli(self, n: int, slot: int) -> int:
        """What is left of a device in milli-GPU: min(free cores share, free memory share).

        0 for an unhealthy or cordoned device or one whose split slots are all taken:
        nothing more fits.
        """
        return devices.free_milli(
            healthy=bool(self.dev_healthy[n, slot]) and not self.dev_cordoned[n, slot],
            split_count=int(self.dev_split[n, slot]),
            slices=int(self.dev_used[n, slot]),
            memory_mib=int(self.dev_mem[n, slot]),
            memory_used_mib=int(self.dev_mem_used[n, slot]),
            cores_percent=int(self.dev_cores[n, slot]),
            cores_used=int(self.dev_cores_used[n, slot]),
        )

    # -- changes -------------------------------------------------------------------------

    def ledger_with(self, placement: Placement) -> NodeLedger:
        """The placement's node ledger with the placement added (pure; for a CAS commit)."""
        cur = self.ledgers[self.node_index[placement.node]].without(placement.pod_uid)
        charges = cur.charges
        if placement.charge.cpu_milli or placement.charge.memory_mib:
            charges = (*charges, placement.charge)
        return NodeLedger(node=cur.node, slices=(*cur.slices, *placement.slices), charges=charges)

    def apply(self, placement: Placement) -> None:
        """Record a placement in the view (in-process replay; on the bus the CAS does it)."""
        n = self.node_index[placement.node]
        ledger = self.ledger_with(placement)
        self.ledgers[n] = ledger
        self.pod_nodes[placement.pod_uid] = n
        if any(s.init for s in placement.slices):
            # init slices book their peak, not their sum: count the node anew
            self.ledgers[n] = ledger
            self._recount(n)
            return
        for s in placement.slices:
            slot = s.device_index
            self.dev_mem_used[n, slot] += s.memory_mib
            self.dev_cores_used[n, slot] += s.cores_percent
            self.dev_used[n, slot] += 1
        self.cpu_used[n] += placement.charge.cpu_milli
        self.mem_used[n] += placement.charge.memory_mib
        self._refresh(n)

    def release(self, pod_uid: str) -> NodeLedger | None:
        """Free exactly the pod's slices; returns the node's new ledger (None if unknown)."""
        n = self.pod_nodes.pop(pod_uid, None)
        if n is None:
            return None
        ledger = self.ledgers[n].without(pod_uid)
        self.ledgers[n] = ledger
        self._recount(n)
        return ledger

    def node_of(self, pod_uid: str) -> str | None:
        """The node whose ledger holds ``pod_uid``, or None."""
        n = self.pod_nodes.get(pod_uid)
        return None if n is None else self.nodes[n]

    def placement_of(self, pod_uid: str) -> Placement | None:
        """The placement ``pod_uid`` holds: its node, slices and charge (a zero charge when
        it has none), namespace and pod name as its slices give them; None when no ledger
        holds it."""
        n = self.pod_nodes.get(pod_uid)
        if n is None:
            return None
        ledger = self.ledgers[n]
        slices = tuple(s for s in ledger.slices if s.pod_uid == pod_uid)
        charge = next((c for c in ledger.charges if c.pod_uid == pod_uid), None)
        return Placement(
            pod_uid=pod_uid,
            namespace=slices[0].namespace if slices else "",
            pod=slices[0].pod if slices else "",
            node=self.nodes[n],
            slices=slices,
            charge=charge or PodCharge(pod_uid=pod_uid),
        )
