"""Namespace quotas on GPU memory and cores: does a placement fit its namespace's quota?

HAMi's rules (Project-HAMi/HAMi), restated:

- A ResourceQuota limits a device resource by the key ``limits.<resource>`` of its
  ``spec.hard``: ``limits.nvidia.com/gpumem`` (MiB) and ``limits.nvidia.com/gpucores``
  (percent); other keys are not HAMi's (``pkg/device/quota.go``, ``managedQuotaName``),
  and a value that is not a whole number is skipped (``addQuotaLocked``, ``AsInt64``).
- A pod counts the memory and cores of every slice it holds, per device times devices, its
  init containers collapsed as it books them (``pkg/device/nvidia/device.go``, ``fitQuota``
  over ``CollapseInitContainerUsage``; ``pkg/device/quota.go``, ``countPodDevices``).
- It fits when, for each resource with a limit set, the namespace's usage plus the pod's
  stays within the limit; a limit of 0 that is set refuses every slice, a resource no
  ResourceQuota limits is unlimited (``QuotaManager.FitQuota``, ``LimitSet``). A refusal
  is HAMi's ``ResourceQuotaNotFit`` (``pkg/device/common/common.go``).

Kubernetes' own quota admission counts an extended resource only as ``requests.<name>``
(Kubernetes documentation, "Resource Quotas", "Resource quota for extended resources"),
so ``limits.nvidia.com/gpumem`` is enforced by the scheduler alone, as in HAMi.

Where vslice differs: several ResourceQuotas in one namespace are each enforced, as the
API server enforces them (Kubernetes documentation, "Resource Quotas": the tightest
limit binds), where HAMi keeps whichever it read last; and the check is made once for the
chosen placement at commit, on the namespace's charges in the ``<prefix>-quotas`` bucket,
not per device during the fit on one scheduler's memory.

Pure: no I/O; ``services.scheduler.adapters.quotas`` reads the bucket, calls these and
commits the result by compare-and-set.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from libshared import ledgers
from libshared import quotas as schema
from libshared.events import Placement
from libshared.quantities import parse_quantity

MEMORY_KEY = schema.QUOTA_PREFIX + schema.GPUMEM
CORES_KEY = schema.QUOTA_PREFIX + schema.GPUCORES
NOT_FIT = "ResourceQuotaNotFit"  # HAMi's reason name (pkg/device/common/common.go)


@dataclass(frozen=True)
class Limits:
    """One namespace's limits: ``memory_mib`` (MiB) and ``cores_percent`` (percent), each
    ``None`` when unlimited."""

    memory_mib: int | None = None
    cores_percent: int | None = None


def limits_of(resource_quota: Mapping[str, Any]) -> tuple[Limits, list[str]]:
    """The limits one ResourceQuota object (API JSON) sets on GPU memory and cores, and a
    problem (naming the field and value) for each such key whose value was skipped: not a
    quantity, not a whole number, or negative (HAMi skips what ``AsInt64`` cannot read).
    Never raises."""
    spec = resource_quota.get("spec")
    hard = spec.get("hard") if isinstance(spec, Mapping) else None
    if not isinstance(hard, Mapping):
        return Limits(), []
    got: dict[str, int] = {}
    problems: list[str] = []
    for key in (MEMORY_KEY, CORES_KEY):
        if key not in hard:
            continue
        raw = hard[key]
        try:
            q = parse_quantity(raw)
        except ValueError:
            problems.append(f"spec.hard[{key!r}] {raw!r}: not a quantity")
            continue
        if q != q.to_integral_value() or q < 0 or q > schema.MAX_LIMIT:
            problems.append(f"spec.hard[{key!r}] {raw!r}: not a whole number of 0 or more")
            continue
        got[key] = int(q)
    return Limits(memory_mib=got.get(MEMORY_KEY), cores_percent=got.get(CORES_KEY)), problems


def tightest(limits: Iterable[Limits]) -> Limits:
    """The limits of a namespace with several ResourceQuotas: for each resource the
    smallest limit any of them sets (each quota is enforced)."""
    mem: int | None = None
    cores: int | None = None
    for lim in limits:
        if lim.memory_mib is not None:
            mem = lim.memory_mib if mem is None else min(mem, lim.memory_mib)
        if lim.cores_percent is not None:
            cores = lim.cores_percent if cores is None else min(cores, lim.cores_percent)
    return Limits(memory_mib=mem, cores_percent=cores)


def charge_of(pod_uid: str, slices: Iterable[ledgers.Slice]) -> schema.QuotaCharge:
    """What ``slices`` (one pod's) count against its namespace's quota: memory (MiB) and
    cores (percent) summed over devices, init containers collapsed (``ledgers.booked``).
    Only NVIDIA slices count: the quota limits ``nvidia.com/gpumem`` and ``gpucores``, and
    HAMi enforces quotas in NVIDIA's ``Fit`` alone (its Hygon ``Fit`` checks none), so a
    DCU slice is charged to no NVIDIA quota."""
    booked = ledgers.booked(tuple(s for s in slices if s.vendor == "NVIDIA"))
    return schema.QuotaCharge(
        pod_uid=pod_uid,
        memory_mib=sum(m for m, _, _ in booked.values()),
        cores_percent=sum(c for _, c, _ in booked.values()),
    )


def placement_charge(placement: Placement) -> schema.QuotaCharge:
    """``charge_of`` the slices of ``placement``."""
    return charge_of(placement.pod_uid, placement.slices)


def placed_charges(
    node_ledgers: Iterable[ledgers.NodeLedger],
) -> dict[str, dict[str, schema.QuotaCharge]]:
    """Namespace -> pod UID -> charge of every pod holding slices in ``node_ledgers``."""
    slices: dict[tuple[str, str], list[ledgers.Slice]] = {}
    for ledger in node_ledgers:
        for s in ledger.slices:
            slices.setdefault((s.namespace, s.pod_uid), []).append(s)
    out: dict[str, dict[str, schema.QuotaCharge]] = {}
    for (ns, uid), held in slices.items():
        out.setdefault(ns, {})[uid] = charge_of(uid, held)
    return out


def refusal(quota: schema.NamespaceQuota, charge: schema.QuotaCharge) -> str | None:
    """Why ``charge`` does not fit ``quota`` (the pod's own earlier charge, if any, not
    counted), or None when it fits. The reason starts with ``ResourceQuotaNotFit`` and
    names the namespace, the resource, what is asked, used and the limit."""
    others = [c for c in quota.charges if c.pod_uid != charge.pod_uid]
    used_mem = sum(c.memory_mib for c in others)
    used_cores = sum(c.cores_percent for c in others)
    for resource, unit, asked, used, limit in (
        (schema.GPUMEM, " MiB", charge.memory_mib, used_mem, quota.memory_mib),
        (schema.GPUCORES, " %", charge.cores_percent, used_cores, quota.cores_percent),
    ):
        if limit is not None and used + asked > limit:
            return (
                f"{NOT_FIT}: namespace {quota.namespace} asks {asked}{unit} of {resource}"
                f" with {used}{unit} in use of its quota {limit}{unit}"
                f" (ResourceQuota limits.{resource})"
            )
    return None


def charged(quota: schema.NamespaceQuota, charge: schema.QuotaCharge) -> schema.NamespaceQuota:
    """``quota`` with ``charge`` in place of the pod's earlier charge (no check: see
    ``refusal``). Raises ``ValueError`` when the namespace already holds ``MAX_CHARGES``
    other pods."""
    others = tuple(c for c in quota.charges if c.pod_uid != charge.pod_uid)
    if len(others) >= schema.MAX_CHARGES:
        raise ValueError(
            f"namespace {quota.namespace}: {len(others)} pods charged, at most"
            f" {schema.MAX_CHARGES - 1} others may be"
        )
    return msgspec.structs.replace(quota, charges=(*others, charge))


def uncharged(quota: schema.NamespaceQuota, pod_uid: str) -> schema.NamespaceQuota | None:
    """``quota`` without ``pod_uid``'s charge; None when it had none."""
    if quota.charge_of(pod_uid) is None:
        return None
    return msgspec.structs.replace(
        quota, charges=tuple(c for c in quota.charges if c.pod_uid != pod_uid)
    )


def limited(
    quota: schema.NamespaceQuota | None,
    namespace: str,
    limits: Limits,
    placed: Mapping[str, schema.QuotaCharge],
) -> schema.NamespaceQuota | None:
    """The namespace's value once its ResourceQuotas set ``limits``: the charges it holds,
    plus the ones of ``placed`` pods (pod UID -> charge, from the ledger) it misses
    (a namespace is charged only once it has a value). None when nothing changes."""
    base = quota or schema.NamespaceQuota(namespace=namespace)
    known = {c.pod_uid for c in base.charges}
    missing = tuple(c for uid, c in sorted(placed.items()) if uid not in known)
    new = msgspec.structs.replace(
        base,
        memory_mib=limits.memory_mib,
        cores_percent=limits.cores_percent,
        charges=(*base.charges, *missing),
    )
    return None if quota is not None and new == quota else new


def reconciled(
    quota: schema.NamespaceQuota,
    *,
    placed: Mapping[str, schema.QuotaCharge],
    claimed: Collection[str],
) -> schema.NamespaceQuota | None:
    """The namespace's charges made to agree with the ledger: each pod in ``placed`` (pod
    UID -> its charge, from a caught-up ledger) charged what it holds, and the charges of
    pods in no ledger dropped unless the pod is in ``claimed`` (a schedule in flight
    reserves before its ledger commit). None when nothing changes.

    This is what heals a replica that died between a reservation and its commit, or
    between a release and its uncharge."""
    charges = [
        placed.get(c.pod_uid, c)
        for c in quota.charges
        if c.pod_uid in placed or c.pod_uid in claimed
    ]
    known = {c.pod_uid for c in charges}
    charges.extend(c for uid, c in sorted(placed.items()) if uid not in known)
    new = msgspec.structs.replace(quota, charges=tuple(charges))
    return None if new == quota else new
