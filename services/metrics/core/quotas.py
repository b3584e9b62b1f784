"""The quota families' series from the ``<prefix>-quotas`` bucket's values.

HAMi exports, per namespace and device resource its ``QuotaManager`` tracks,
``hami_resource_quota_used`` (labels ``namespace``, ``quota_name``, ``limit``) and, only
for a limit that a ResourceQuota sets, ``hami_resource_quota_limit`` (``namespace``,
``quota_name``) (Project-HAMi/HAMi ``cmd/scheduler/metrics.go``, ``collectQuotaMetrics``;
``quota_name`` is the resource without ``limits.``, e.g. ``nvidia.com/gpumem``). A
namespace with a value in the bucket tracks both of vslice's resources, as HAMi tracks
both once a ResourceQuota names one of them or a pod is charged.

Pure: the caller passes the values (``adapters.quotas`` watches the bucket).
"""

from __future__ import annotations

from collections.abc import Iterable

from libshared import quotas as schema
from services.metrics.core import exporting


def series(values: Iterable[schema.NamespaceQuota]) -> list[exporting.Quota]:
    """One ``exporting.Quota`` per namespace and resource (``nvidia.com/gpumem`` in MiB,
    ``nvidia.com/gpucores`` in percent), in namespace order; a limit that is not set is
    reported as 0 with ``limit_set`` False, as HAMi does."""
    out: list[exporting.Quota] = []
    for value in sorted(values, key=lambda v: v.namespace):
        memory_mib, cores_percent = value.used()
        for resource, used, limit in (
            (schema.GPUMEM, memory_mib, value.memory_mib),
            (schema.GPUCORES, cores_percent, value.cores_percent),
        ):
            out.append(
                exporting.Quota(
                    namespace=value.namespace,
                    resource=resource,
                    used=float(used),
                    limit=float(limit or 0),
                    limit_set=limit is not None,
                )
            )
    return out
