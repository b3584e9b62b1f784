"""A fleet view for the dashboard tests, without a bus: the openb node list (1,213 nodes,
6,212 GPUs) or a generated one, with slices of a few shapes and namespaces, served by the
metrics service's HTTP application on a free loopback port."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgspec
from prometheus_client import CollectorRegistry

from libshared import traces
from libshared.devices import Device, NodeDevices
from services.metrics.adapters import http
from services.metrics.core.views import FleetView
from tests.bus.conftest import repo_root
from tests.metrics import fixtures as fx

OPENB_FLEET = (
    Path(os.environ.get("VSLICE_TRACES") or repo_root().parent / "shared" / "traces" / "openb")
    / "openb_node_list_gpu_node.csv"
)
USAGE_TTL_S = 30.0


def fleet_nodes(count: int = 1214) -> list[NodeDevices]:
    """The openb GPU node list when present, else ``count`` generated nodes of 1-8 GPUs."""
    if OPENB_FLEET.exists():
        return traces.read_fleet(OPENB_FLEET, split_count=10)
    models = ("V100M32", "T4", "A10", "P100")
    return [
        NodeDevices(
            node=f"gen-node-{n:04d}",
            devices=tuple(
                Device(
                    uuid=f"gen-node-{n:04d}-gpu{i}",
                    index=i,
                    type=models[n % 4],
                    memory_mib=traces.GPU_MEMORY_MIB[models[n % 4]],
                    split_count=10,
                )
                for i in range(1 + n % 8)
            ),
        )
        for n in range(count)
    ]


def populate(view: FleetView, nodes: list[NodeDevices]) -> int:
    """Register ``nodes`` in ``view`` and give every third GPU one to three slices of
    namespaces ``team-0`` .. ``team-9``; returns the number of slices."""
    total = 0
    for n, node in enumerate(nodes):
        view.put_node(node.node, fx.registration(node.node, *node.devices))
        held = []
        for d in node.devices[::3]:
            for k in range(1 + (n + d.index) % 3):
                uid = f"{node.node}-p{d.index}-{k}"
                s = fx.slice_of(uid, d.uuid, index=d.index, memory_mib=d.memory_mib // 8, cores=10)
                held.append(
                    msgspec.structs.replace(s, namespace=f"team-{(n + k) % 10}", pod=f"job-{uid}")
                )
        total += len(held)
        view.put_ledger(node.node, fx.ledger(node.node, *held), n + 1)
    return total


@contextlib.asynccontextmanager
async def serving(
    view: FleetView, *, history_interval_s: float = 0.05, clock: Callable[[], float] = time.time
) -> AsyncIterator[str]:
    """``view``'s metrics application on a free loopback port; yields its base URL."""
    registry = CollectorRegistry(auto_describe=False)
    collector = http.ViewCollector(view=view, usage_ttl_s=USAGE_TTL_S, stats_ttl_s=10.0)
    registry.register(collector)
    app = http.application(
        view,
        registry,
        collector,
        usage_ttl_s=USAGE_TTL_S,
        history_interval_s=history_interval_s,
        clock=clock,
    )
    runner, port = await http.serve(app, host="127.0.0.1", port=0)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
