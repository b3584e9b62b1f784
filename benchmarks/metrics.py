"""Scrape cost of the metrics service at the openb fleet's size, beside a baseline.

Builds a fleet view of 1,213 nodes with 6,212 GPUs (the openb fleet's counts: 8, 4 and 2
GPUs per node) holding ``--slices`` slices, then times, over ``--repeat`` runs: a
``/metrics`` scrape (snapshot, families, text encoding), the dashboard's ``/api/fleet``
object with its JSON encoding, the dashboard page's first load (``/api/summary`` and the
first ``/api/nodes`` page) against it, and as the baseline prometheus-client encoding the same
number of series from plain labelled ``Gauge`` children (the library's own cost, with no
view to join). Prints milliseconds (median) and the series count.

    .venv/bin/python benchmarks/metrics.py --slices 8000
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Gauge, generate_latest

from libshared import events
from libshared.devices import Device, NodeDevices
from libshared.ledgers import NodeLedger, Slice
from services.metrics.adapters.http import ViewCollector
from services.metrics.core import dashboards
from services.metrics.core.views import FleetView

NODES = 1213
GPUS = 6212


def fleet(slices: int, *, seed: int = 1) -> FleetView:
    rng = random.Random(seed)
    view = FleetView()
    sizes = [8] * 600 + [4] * 93 + [2] * 520  # 1,213 nodes, 6,212 GPUs
    assert len(sizes) == NODES and sum(sizes) == GPUS
    placed: dict[str, list[Slice]] = {}
    devices = []
    for n, count in enumerate(sizes):
        node = f"node-{n:04d}"
        devs = tuple(
            Device(uuid=f"GPU-{n}-{g}", index=g, type="V100M32", memory_mib=32768, split_count=10)
            for g in range(count)
        )
        view.put_node(node, events.ENCODER.encode(NodeDevices(node=node, devices=devs)))
        devices += [(node, d) for d in devs]
    for i in range(slices):
        node, dev = rng.choice(devices)
        placed.setdefault(node, []).append(
            Slice(
                pod_uid=f"uid-{i}",
                namespace="bench",
                pod=f"pod-{i}",
                container="main",
                container_index=0,
                uuid=dev.uuid,
                device_index=dev.index,
                memory_mib=1024,
                cores_percent=5,
            )
        )
    for seq, (node, held) in enumerate(sorted(placed.items()), start=1):
        view.put_ledger(node, events.ENCODER.encode(NodeLedger(node=node, slices=tuple(held))), seq)
    return view


def median_ms(run: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=8000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    view = fleet(args.slices)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ViewCollector(view=view, usage_ttl_s=30, stats_ttl_s=30))
    text = generate_latest(registry)
    series = sum(1 for line in text.splitlines() if line and not line.startswith(b"#"))
    scrape = median_ms(lambda: generate_latest(registry), args.repeat)

    def api() -> bytes:
        now = time.time()
        snap = view.snapshot(now=now, usage_ttl_s=30)
        return json.dumps(dashboards.fleet(snap, now=now)).encode()

    page = median_ms(api, args.repeat)
    fleet_bytes = len(api())

    def first_load() -> int:
        # what the dashboard page asks for first: the summary and one page of nodes
        now = time.time()
        snap = view.snapshot(now=now, usage_ttl_s=30)
        tracker = dashboards.Tracker()
        summary = json.dumps(dashboards.summary(snap, now=now, tracker=tracker))
        query = dashboards.NodeQuery()
        nodes = json.dumps(dashboards.node_page(snap, query, now=now, tracker=tracker))
        return len(summary) + len(nodes)

    load = median_ms(first_load, args.repeat)
    load_bytes = first_load()
    plain = CollectorRegistry()
    gauge = Gauge("plain_series", "baseline", ["node", "device_uuid", "pod"], registry=plain)
    for i in range(series):
        gauge.labels(node=f"n{i % NODES}", device_uuid=f"G{i}", pod=f"p{i}").set(i)
    baseline = median_ms(lambda: generate_latest(plain), args.repeat)
    print(f"fleet: {NODES} nodes, {GPUS} GPUs, {args.slices} slices -> {series} series")
    print(f"/metrics scrape      {scrape:8.1f} ms  ({len(text) / 1e6:.1f} MB)")
    print(f"/api/fleet (JSON)    {page:8.1f} ms  ({fleet_bytes / 1e3:.0f} KB)")
    print(
        f"dashboard first load {load:8.1f} ms  ({load_bytes / 1e3:.0f} KB: /api/summary +"
        f" /api/nodes; {page / load:.1f}x faster, {fleet_bytes / load_bytes:.0f}x smaller"
        " than /api/fleet)"
    )
    print(f"baseline: {series} plain Gauge series encoded {baseline:8.1f} ms")


if __name__ == "__main__":
    main()
