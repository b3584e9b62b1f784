"""What namespace quotas cost a scheduler replica: pods scheduled and released per second by
one in-process replica on a real nats-server (TLS and authorization on), without a quota
gate (the baseline), with a gate whose namespace has no quota (it follows the bucket's
keys, so it should cost nothing), and with a gate enforcing a quota (one read and one
compare-and-set of the namespace's key per schedule and per release).

Prints one row per mode: pods/s (the median of ``--rounds`` runs, interleaved with the
other modes' in a rotating order after one warm-up run), schedule latency p50/p99 (ms,
over every round) and the ratio of pods/s to the baseline of the same run. Figures vary
with what else runs on the machine: compare rows of one run.

    .venv/bin/python benchmarks/quotas.py --pods 200 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from pathlib import Path

from libshared import connecting, events
from libshared import quotas as schema
from libshared.devices import Device, NodeDevices
from libshared.natsserver import NatsServer
from libshared.permissions import Role
from libshared.resources import ContainerRequest, PodRequest
from libshared.subjects import pod_key
from services.scheduler import app as scheduler_app
from services.scheduler.adapters import bus, quotas
from services.scheduler.settings import Settings

NAMESPACE = "bench"


def pod(uid: str) -> PodRequest:
    c = ContainerRequest(
        name="main", index=0, init=False, gpu_count=1, memory_mib=1000, cores_percent=10
    )
    return PodRequest(uid=uid, namespace=NAMESPACE, name=uid, containers=(c,))


async def run(server: NatsServer, mode: str, pods: int) -> tuple[float, list[float]]:
    """Schedule and release ``pods`` pods one after the other: (pods/s, latencies ms)."""
    prefix = f"b{uuid.uuid4().hex[:8]}"
    operator = server.bus_settings(prefix=prefix)
    settings = server.identity(f"sched-{prefix}", Role.SCHEDULER, prefix=prefix)
    admin = await connecting.connect(operator, name="bench")
    nc = await connecting.connect(settings, name="replica")
    try:
        js = nc.jetstream()
        opened = await connecting.ensure_bus(js, settings)
        node = NodeDevices(
            node="n1",
            devices=tuple(
                Device(
                    uuid=f"GPU-{i}", index=i, type="NVIDIA-A100", memory_mib=81920, split_count=10
                )
                for i in range(8)
            ),
        )
        as_operator = await connecting.ensure_bus(admin.jetstream(), operator)
        await as_operator.nodes.put("n1", events.ENCODER.encode(node))
        gate = None
        if mode != "no gate":
            kv = await quotas.open_quotas(js, settings, create=True)
            if mode == "quota":  # as an operator sets it in a bus-only stack
                value = schema.NamespaceQuota(namespace=NAMESPACE, memory_mib=10**9)
                limits = await quotas.open_quotas(admin.jetstream(), operator, create=False)
                await limits.put(pod_key(NAMESPACE), schema.ENCODER.encode(value))
            gate = quotas.QuotaGate(kv=kv)
            await gate.watch()
        s = Settings(bus=settings, name="bench")
        replica = bus.Replica(
            nc=nc,
            js=js,
            bus=opened,
            subjects=settings.subjects,
            scheduler=scheduler_app.build_scheduler(s),
            name=s.name,
            quotas=gate,
        )
        await replica.start()
        latencies = []
        start = time.perf_counter()
        for i in range(pods):
            t0 = time.perf_counter()
            placed = await replica.schedule(pod(f"p{i}"))
            latencies.append(1000 * (time.perf_counter() - t0))
            assert isinstance(placed, events.Placement), placed
            await replica.release(f"p{i}")
        wall = time.perf_counter() - start
        await replica.stop()
        if gate is not None:
            await gate.close()
        return pods / wall, latencies
    finally:
        await nc.close()
        await admin.close()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main_async(pods: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp, NatsServer(data_dir=Path(tmp)) as server:
        await run(server, "no gate", max(1, pods // 5))  # warm-up, not reported
        modes = ("no gate", "gate, namespace unlimited", "quota")
        got: dict[str, list[tuple[float, list[float]]]] = {m: [] for m in modes}
        for i in range(rounds):  # interleaved and rotated: no mode always runs first
            for mode in modes[i % 3 :] + modes[: i % 3]:
                got[mode].append(await run(server, mode, pods))
        print(f"{'run':<28}{'pods/s':>8}{'p50 ms':>8}{'p99 ms':>8}{'ratio':>8}")
        baseline = 0.0
        for mode in modes:
            rate = sorted(r for r, _ in got[mode])[len(got[mode]) // 2]  # median round
            lat = [x for _, lats in got[mode] for x in lats]
            baseline = baseline or rate
            print(
                f"{mode:<28}{rate:>8.0f}{_percentile(lat, 0.5):>8.2f}"
                f"{_percentile(lat, 0.99):>8.2f}{rate / baseline:>8.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--pods", type=int, default=300, help="pods per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs per mode (median shown)")
    args = parser.parse_args()
    asyncio.run(main_async(args.pods, args.rounds))


if __name__ == "__main__":
    main()
