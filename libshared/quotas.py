"""Namespace quotas on GPU memory and cores: the value of the ``<prefix>-quotas`` bucket.

HAMi enforces Kubernetes ResourceQuotas on ``limits.nvidia.com/gpumem`` and
``limits.nvidia.com/gpucores`` (Project-HAMi/HAMi ``pkg/device/quota.go``,
``QuotaManager.FitQuota``; HAMi #893, #1393), keeping the usage in one scheduler's memory.
vslice keeps it on the bus instead, one key per namespace, so any number of scheduler
replicas count the same usage: the value holds the namespace's limits and a charge per pod
holding slices there, and every change is a compare-and-set on the key's revision
(``services.scheduler.adapters.quotas``). Scheduler replicas write it (limits from the
namespace's ResourceQuotas in Kubernetes; in a bus-only stack an operator may write them);
the metrics service reads it for ``hami_resource_quota_used`` / ``_limit``.

Pure data; the decisions are in ``services.scheduler.core.quotas``, the bucket's opening
and compare-and-set in ``services.scheduler.adapters.quotas``.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from libshared import bounds

# The device resources a quota may limit, as HAMi's NVIDIA device names them
# (pkg/device/nvidia/device.go, ``GetResourceNames``: ResourceMemoryName, ResourceCoreName);
# a ResourceQuota limits them as ``limits.<name>`` (pkg/device/quota.go, managedQuotaName).
GPUMEM = "nvidia.com/gpumem"
GPUCORES = "nvidia.com/gpucores"
QUOTA_PREFIX = "limits."
MAX_CHARGES = 10_000  # pods holding slices in one namespace (bounds one value's size)
MAX_LIMIT = 2**63 - 1  # HAMi reads a limit with Quantity.AsInt64

Limit = Annotated[int, msgspec.Meta(ge=0, le=MAX_LIMIT)]
Total = Annotated[int, msgspec.Meta(ge=0, le=MAX_LIMIT)]


class QuotaCharge(msgspec.Struct, frozen=True, kw_only=True):
    """What one pod counts against its namespace's quota: the sum over its slices of
    ``memory_mib`` (MiB, per device times devices) and ``cores_percent`` (percent of a
    card, per device times devices), init containers collapsed as HAMi books them."""

    pod_uid: bounds.Uid
    memory_mib: Total = 0
    cores_percent: Total = 0


class NamespaceQuota(msgspec.Struct, frozen=True, kw_only=True):
    """One namespace's quota value. ``memory_mib`` / ``cores_percent``: the limits of
    ``limits.nvidia.com/gpumem`` (MiB) and ``limits.nvidia.com/gpucores`` (percent),
    ``None`` when no ResourceQuota sets one (HAMi's ``LimitSet`` false); an explicit 0
    refuses every slice. ``charges``: one per pod holding slices, by pod UID."""

    namespace: bounds.Namespace
    memory_mib: Limit | None = None
    cores_percent: Limit | None = None
    charges: Annotated[tuple[QuotaCharge, ...], msgspec.Meta(max_length=MAX_CHARGES)] = ()

    def used(self) -> tuple[int, int]:
        """``(memory MiB, cores percent)`` charged by every pod of the namespace."""
        return (
            sum(c.memory_mib for c in self.charges),
            sum(c.cores_percent for c in self.charges),
        )

    def charge_of(self, pod_uid: str) -> QuotaCharge | None:
        """The charge of ``pod_uid``, None when it has none."""
        return next((c for c in self.charges if c.pod_uid == pod_uid), None)

    @property
    def limited(self) -> bool:
        """True when a limit is set on memory or cores."""
        return self.memory_mib is not None or self.cores_percent is not None


ENCODER = msgspec.json.Encoder()
DECODER = msgspec.json.Decoder(NamespaceQuota)
