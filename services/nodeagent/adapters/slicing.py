"""The node's slices on disk: prepare placed pods, forget released ones after a grace
period, reconcile with the ledger, and read usage back.

``Slicer`` keeps which container slices this node holds (``containers``) and which of
them were released and when. A released container's directory is removed once
``grace_s`` seconds have passed and no process uses it any more (its cache's process
slots and the processes started for it, ``hostroots.in_use``), never before. On start
``reconcile`` makes the host root agree with the ledger -- the truth of what slices
exist: a slice in the ledger without a directory is prepared, a directory of a pod the
ledger no longer holds is released -- so a node agent that was down loses and duplicates
nothing. A directory of the earlier, colliding naming (no ``pod.uid``) is adopted only
when its name is certain to be one held container's under both namings; otherwise it is
moved aside and released (removed once unused) and the slice prepared afresh. The
decisions are ``services.nodeagent.core``; this module does the file I/O.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import msgspec

from libshared import bounds, events
from libshared.ledgers import NodeLedger, PodCharge, Slice
from services.nodeagent.adapters import hostroots
from services.nodeagent.adapters.migdevices import MigError, Realized
from services.nodeagent.core import preparing, usages
from services.nodeagent.core.sharedcaches import SharedCache

log = logging.getLogger("vslice.nodeagent")

MAX_ANCESTORS = 64


class MigControl(Protocol):
    """What the slicer needs of dynamic MIG (``migdevices.NvmlMig``); calls block and
    raise ``MigError``."""

    def instances(self, uuid: str) -> list[Realized]: ...

    def create(self, uuid: str, profile: str, start: int, size: int) -> Realized: ...

    def destroy(self, uuid: str, gpu_instance_id: int) -> None: ...


@dataclass
class Slicer:
    """Slices of ``node`` under ``layout.root``. With ``mig``, the GPUs of ``mig_gpus``
    are in MIG mode: a slice there is a GPU instance, created when the slice is prepared
    and destroyed once no container holds it (``realized``: ``preparing.mig_key`` -> the
    instance). With ``mps`` (a node in ``mps`` mode) the other slices are clients of that
    MPS server. ``dcu_indices``: UUID -> index of the node's DCUs as registered (what a
    DCU slice's ``HIP_VISIBLE_DEVICES`` names)."""

    node: str
    layout: preparing.Layout
    grace_s: float = 5.0
    containers: dict[str, usages.Container] = field(default_factory=dict)
    released: dict[str, float] = field(default_factory=dict)  # key -> monotonic time
    mig: MigControl | None = None
    mig_gpus: frozenset[str] = frozenset()
    realized: dict[tuple[str, int], Realized] = field(default_factory=dict)
    mps: preparing.Mps | None = None
    dcu_indices: dict[str, int] = field(default_factory=dict)

    def mig_uuids(self) -> dict[tuple[str, int], str]:
        """``preparing.mig_key`` -> MIG device UUID of every instance realized."""
        return {k: r.mig_uuid for k, r in self.realized.items()}

    def plan(self, placement: events.Placement) -> list[preparing.ContainerPlan]:
        """``preparing.plan`` of ``placement`` with the MIG instances realized for it."""
        return preparing.plan(
            placement, self.layout, self.mig_uuids(), self.mps, dcu_indices=self.dcu_indices
        )

    def _realize(self, placement: events.Placement) -> None:
        """Create (or find) the GPU instance of every MIG slice of ``placement``. Raises
        ``MigError``, or ``ValueError`` for a MIG slice on a GPU not in MIG mode here or
        with no size (``mig_size`` 0)."""
        for s in placement.slices:
            key = preparing.mig_key(s)
            if key is None:
                continue
            if self.mig is None or s.uuid not in self.mig_gpus:
                raise ValueError(f"slice {s.uuid} of {s.container}: GPU not in MIG mode here")
            if s.mig_size < 1:
                raise ValueError(f"slice {s.uuid} of {s.container}: mig_size={s.mig_size}")
            held = self.realized.get(key)
            if held is not None and held.profile == s.mig_profile:
                continue
            if held is not None:  # left by a released pod, of another profile
                self.mig.destroy(held.parent, held.gpu_instance_id)
                del self.realized[key]
            self.realized[key] = self.mig.create(s.uuid, s.mig_profile, s.mig_start, s.mig_size)

    def sweep_instances(self) -> list[Realized]:
        """Destroy every realized instance no container holds (released and removed, or
        found on the GPU with no slice in the ledger); returns those destroyed. One still
        in use is kept and tried again at the next sweep."""
        if self.mig is None:
            return []
        held = {
            k
            for c in self.containers.values()
            for k in (preparing.mig_key(s) for s in c.slices)
            if k is not None
        }
        gone = []
        for key, r in sorted(self.realized.items()):
            if key in held:
                continue
            try:
                self.mig.destroy(r.parent, r.gpu_instance_id)
            except MigError as exc:
                level = logging.INFO if exc.in_use else logging.WARNING
                log.log(level, "MIG instance not destroyed yet", extra={"error": exc.reason})
                continue
            del self.realized[key]
            gone.append(r)
        return gone

    @property
    def root(self) -> Path:
        """The host root."""
        return Path(self.layout.root)

    def prepare(self, placement: events.Placement) -> events.Ready | events.Failed:
        """Create every container's directory and shared cache file of ``placement``
        (existing ones are kept as they are) and answer ``Ready`` with each container's
        environment, or ``Failed`` naming what went wrong."""
        try:
            self._realize(placement)
            plans = self.plan(placement)
            for p in plans:
                created = hostroots.prepare(p)
                log.info(
                    "slice prepared" if created else "slice already prepared",
                    extra={"pod_uid": p.pod_uid, "container": p.container, "dir": p.directory},
                )
        except (ValueError, OSError, MigError) as exc:
            log.error("prepare failed", extra={"pod_uid": placement.pod_uid, "error": str(exc)})
            return events.Failed(
                pod_uid=placement.pod_uid, node=self.node, reason=bounds.clip(str(exc))
            )
        for p in plans:
            self.containers[p.key] = usages.Container(
                key=p.key,
                pod_uid=placement.pod_uid,
                namespace=placement.namespace,
                pod=placement.pod,
                container=p.container,
                slices=p.slices,
            )
            self.released.pop(p.key, None)
        return events.Ready(
            pod_uid=placement.pod_uid, node=self.node, env={p.container: p.env for p in plans}
        )

    def release(self, pod_uid: str, *, now: float | None = None) -> list[str]:
        """Start the grace period of every container of ``pod_uid``; returns their keys."""
        at = time.monotonic() if now is None else now
        keys = [k for k, c in self.containers.items() if c.pod_uid == pod_uid]
        for k in keys:
            self.released.setdefault(k, at)
        return keys

    def release_departed(self, live: set[str], *, now: float | None = None) -> list[str]:
        """Start the grace period of every container, known or only on disk, whose pod UID
        is not in ``live`` (the pods on the node, in Kubernetes); a released container
        whose pod is live again is kept. Returns the keys released now."""
        at = time.monotonic() if now is None else now
        out = []
        for key in sorted(set(self.containers) | set(hostroots.existing(self.root))):
            known = self.containers.get(key)
            parsed = preparing.parse_key(key)
            uid = known.pod_uid if known is not None else parsed[0] if parsed else None
            if uid in live:
                self.released.pop(key, None)
            elif key not in self.released:
                self.released[key] = at
                out.append(key)
        return out

    def reconcile(self, ledger: NodeLedger | None) -> tuple[list[str], list[str]]:
        """Make the host root agree with ``ledger`` (None: the node holds nothing).

        Returns ``(prepared, released)``: pod UIDs prepared now or found prepared, and
        container keys whose pod the ledger no longer holds (their grace starts now).
        """
        held: dict[str, list[Slice]] = {}
        for s in ledger.slices if ledger else ():
            held.setdefault(s.pod_uid, []).append(s)
        self._adopt_legacy(held)
        self._adopt_instances()
        prepared = []
        for uid, slices in sorted(held.items()):
            answer = self.prepare(
                events.Placement(
                    pod_uid=uid,
                    namespace=slices[0].namespace,
                    pod=slices[0].pod,
                    node=self.node,
                    slices=tuple(slices),
                    charge=PodCharge(pod_uid=uid),
                )
            )
            if isinstance(answer, events.Ready):
                prepared.append(uid)
        keys = set(self.containers)
        orphans = [k for k in hostroots.existing(self.root) if k not in keys]
        now = time.monotonic()
        for k in orphans:
            self.released.setdefault(k, now)
        return prepared, orphans

    def _adopt_instances(self) -> None:
        """Take in the GPU instances the MIG GPUs hold now: those a slice of the ledger
        names are kept for it, the others are destroyed by the next sweep."""
        if self.mig is None:
            return
        for uuid in sorted(self.mig_gpus):
            try:
                found = self.mig.instances(uuid)
            except MigError as exc:
                log.warning("MIG instances not listed", extra={"error": exc.reason})
                continue
            for r in found:
                self.realized.setdefault((uuid, r.start), r)

    def _adopt_legacy(self, held: dict[str, list[Slice]]) -> None:
        """Mark as its pod's a directory of the earlier naming when that is certain: its
        name is the pod's key under both namings and no other held container had that
        name under the earlier one. Any other unmarked directory is left to ``prepare``
        (moved aside, a fresh one made) or released as an orphan."""
        pairs = {(uid, s.container) for uid, slices in held.items() for s in slices}
        by_legacy: dict[str, list[tuple[str, str]]] = {}
        for uid, container in pairs:
            by_legacy.setdefault(preparing.legacy_key(uid, container), []).append((uid, container))
        for key in hostroots.existing(self.root):
            certain = False
            if hostroots.marked(self.root, key):
                continue
            claimants = by_legacy.get(key, [])
            with contextlib.suppress(ValueError):
                certain = len(claimants) == 1 and preparing.container_key(*claimants[0]) == key
            if certain:
                uid, container = claimants[0]
                hostroots.mark(self.root, key, pod_uid=uid, container=container)
                log.info("directory of the earlier naming adopted", extra={"key": key})

    def sweep(self, *, now: float | None = None) -> list[str]:
        """Remove released containers whose grace passed and that no process uses;
        returns the keys removed."""
        at = time.monotonic() if now is None else now
        removed = []
        for key, since in sorted(self.released.items()):
            if at - since < self.grace_s:
                continue
            users = hostroots.in_use(self.root, key)
            if users:
                log.info("released slice still in use", extra={"key": key, "pids": str(users)})
                continue
            hostroots.remove(self.root, key)
            self.released.pop(key, None)
            self.containers.pop(key, None)
            removed.append(key)
            log.info("slice directory removed", extra={"key": key})
        self.sweep_instances()
        return removed

    def active(self) -> list[usages.Container]:
        """Containers not released, by key."""
        return [c for k, c in sorted(self.containers.items()) if k not in self.released]

    def owners_of(self, pids: list[int]) -> dict[int, str]:
        """Container key of each of ``pids`` that its environment (the container's cache
        path) or an ancestor started for a container ties to one.

        The cache path a process names is a host path for ``vslice run``; in a pod it is
        the container path Allocate mounts, the same in every container, so it is
        resolved in the process's own mount namespace and matched to the host cache file
        mounted there by device and inode (``hostroots.identity_seen_by``). That needs
        the pod's processes in the agent's ``/proc``: the DaemonSet runs with
        ``hostPID``.
        """
        by_cache = {
            f"{preparing.container_dir(self.layout.root, k)}/{preparing.CACHE_FILE}": k
            for k in self.containers
        }
        by_identity: dict[hostroots.FileIdentity, str] | None = None
        started = {pid: k for k in self.containers for pid in hostroots.owners(self.root, k)}
        out = {}
        for pid in pids:
            path = hostroots.environ_cache(pid) or ""
            key = by_cache.get(path)
            if key is None and path:
                if by_identity is None:
                    by_identity = {}
                    for host_path, k in by_cache.items():
                        identity = hostroots.file_identity(host_path)
                        if identity is not None:
                            by_identity[identity] = k
                seen = hostroots.identity_seen_by(pid, path)
                key = by_identity.get(seen) if seen is not None else None
            cur: int | None = pid
            for _ in range(MAX_ANCESTORS):
                if key is not None or cur is None or cur <= 1:
                    break
                key = started.get(cur)
                cur = hostroots.parent_of(cur)
            if key is not None:
                out[pid] = key
        return out

    def usage(
        self,
        devices: list[usages.DeviceReading],
        processes: list[usages.ProcessReading],
        *,
        margin_bytes: int,
    ) -> events.NodeUsage:
        """The node's ``NodeUsage`` now, from every container's cache file and NVML."""
        owners = self.owners_of(sorted({p.pid for p in processes}))
        in_namespace = {pid: hostroots.namespace_pid(pid) for pid in owners}
        caches: dict[str, SharedCache | str] = {}
        for c in self.active():
            cache = hostroots.read_cache(self.root, c.key)
            if isinstance(cache, SharedCache):
                # a pod's processes wrote the pids of its own PID namespace
                cache = usages.with_host_pids(
                    cache,
                    {
                        ns_pid: pid
                        for pid, ns_pid in in_namespace.items()
                        if ns_pid is not None and owners[pid] == c.key
                    },
                )
            caches[c.key] = cache
        report = usages.report(
            node=self.node,
            at=time.time(),
            containers=list(self.containers.values()),
            caches=caches,
            devices=devices,
            processes=processes,
            owners=owners,
            margin_bytes=margin_bytes,
        )
        migs = tuple(
            events.MigInstanceUsage(
                uuid=r.parent,
                mig_uuid=r.mig_uuid,
                profile=r.profile,
                gpu_instance_id=r.gpu_instance_id,
                compute_instance_id=max(0, r.compute_instance_id),
                start=r.start,
                size=r.size,
            )
            for _, r in sorted(self.realized.items())
            if r.mig_uuid
        )
        return msgspec.structs.replace(report, migs=migs) if migs else report
