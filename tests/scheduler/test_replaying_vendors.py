"""The trace replay on a mixed-vendor fleet: NVIDIA nodes and Hygon DCU nodes
(``traces/mixed_fleet.csv``), pods asking NVIDIA GPUs or DCUs by ``gpu_spec``
(``traces/mixed_pods.csv``). Every DCU pod lands on DCUs only (of the models it names),
every NVIDIA pod on NVIDIA GPUs only, and the report's per-vendor figures add up to the
fleet's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from libshared import traces
from libshared.events import Placement
from libshared.ledgers import PodCharge, Slice
from services.scheduler.core import replaying
from services.scheduler.core.clusters import MILLI, Cluster
from services.scheduler.core.deciding import Scheduler
from vslice import cli

HERE = Path(__file__).parent / "traces"
FLEET = HERE / "mixed_fleet.csv"
PODS = HERE / "mixed_pods.csv"
POLICIES = ["hami", "hami-spread", "fgd", "bestfit", "random"]
SEEDS = [42, 43, 44]
CHARGE = PodCharge(pod_uid="u")


def test_the_mixed_fleet_registers_dcus_with_their_vendor_and_memory() -> None:
    fleet = {n.node: n for n in traces.read_fleet(FLEET)}
    kinds = {
        name: {(d.type, d.vendor, d.memory_mib) for d in n.devices} for name, n in fleet.items()
    }
    assert kinds == {
        "nv-0": {("V100M16", "NVIDIA", 16384)},
        "nv-1": {("T4", "NVIDIA", 15360)},
        "dcu-0": {("DCU-Z100", "DCU", 32768)},
        "dcu-1": {("DCU-K100", "DCU", 65536)},
        "cpu-0": set(),
    }


def _placements(policy: str, seed: int) -> list[tuple[traces.TracePod, Placement | None]]:
    """Each arrival of one in-process experiment with its placement (None: refused),
    decided and applied as ``replaying.run_seed`` does."""
    fleet, pods = traces.read_fleet(FLEET), traces.read_pods(PODS)
    cluster = Cluster(max_devices=4)
    cluster.upsert_nodes(fleet)
    scheduler = Scheduler(
        cluster, policy=policy, workload=replaying.trace_workload(pods), seed=seed
    )
    out: list[tuple[traces.TracePod, Placement | None]] = []
    sequence = replaying.arrivals(pods, seed=seed, capacity=replaying.capacity_milli(fleet))
    for i, pod in enumerate(sequence):
        decision = scheduler.decide(pod.request(f"{seed}-{i}"), explain=False)
        if isinstance(decision, Placement):
            cluster.apply(decision)
            out.append((pod, decision))
        else:
            out.append((pod, None))
    return out


@pytest.mark.parametrize("policy", POLICIES)
def test_every_pod_lands_only_on_devices_of_its_vendor_and_models(policy: str) -> None:
    devices = {d.uuid: d for n in traces.read_fleet(FLEET) for d in n.devices}
    placed = {"NVIDIA": 0, "DCU": 0}
    for seed in SEEDS:
        for pod, placement in _placements(policy, seed):
            if placement is None:
                continue
            held = [devices[s.uuid] for s in placement.slices]
            assert len(held) == pod.num_gpu, pod
            assert {d.vendor for d in held} <= {pod.vendor}, (pod, held)
            for d in held:
                assert not pod.gpu_spec or any(m in d.type for m in pod.gpu_spec), (pod, d)
            placed[pod.vendor] += bool(held)
    # the trace's pods of both vendors were placed, so the check above had work to do
    assert placed["NVIDIA"] > 0 and placed["DCU"] > 0


def _dcu_share(sequence: list[traces.TracePod], capacity: int) -> tuple[int, int]:
    """Milli-GPU asked by DCU pods and by NVIDIA pods among the arrivals up to 100 %."""
    asked = {"DCU": 0, "NVIDIA": 0}
    requested = 0
    for pod in sequence:
        requested += pod.milli_total
        if requested > capacity:
            break
        asked[pod.vendor] += pod.milli_total
    return asked["DCU"], asked["NVIDIA"]


@pytest.mark.parametrize("policy", POLICIES)
def test_the_report_splits_arrivals_and_allocation_by_vendor(policy: str) -> None:
    fleet, pods = traces.read_fleet(FLEET), traces.read_pods(PODS)
    capacity = replaying.capacity_milli(fleet)
    for seed in SEEDS:
        result = replaying.run_seed(fleet, pods, policy=policy, seed=seed)
        dcu, nvidia = result.by_vendor["DCU"], result.by_vendor["NVIDIA"]
        assert set(result.by_vendor) == {"DCU", "NVIDIA"}
        assert (dcu["gpus"], nvidia["gpus"]) == (6, 6)
        sequence = replaying.arrivals(pods, seed=seed, capacity=capacity)
        asked_dcu, asked_nvidia = _dcu_share(sequence, capacity)
        assert dcu["arrived"] == pytest.approx(asked_dcu / (6 * MILLI))
        assert nvidia["arrived"] == pytest.approx(asked_nvidia / (6 * MILLI))
        assert dcu["foreign_slices"] == nvidia["foreign_slices"] == 0
        for row in (dcu, nvidia):
            assert 0 < row["allocated"] <= row["arrived"]
            assert row["pods_placed"] > 0
        # the two vendors' allocation is the fleet's, at the same moment
        fleet_milli = result.allocated_at(1.0) * capacity
        assert 6 * MILLI * (dcu["allocated"] + nvidia["allocated"]) == pytest.approx(fleet_milli)


def test_the_cli_report_and_table_give_each_vendors_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "mixed.json"
    argv = ["replay", str(PODS), "--fleet", str(FLEET), "--in-process", "--quiet"]
    argv += ["--seeds", "42-43", "--policy", "fgd", "--jobs", "1", "--json", str(out)]
    assert cli.main(argv) == 0
    report = json.loads(out.read_text())
    assert set(report["by_vendor"]) == {"DCU", "NVIDIA"}
    assert report["by_vendor"]["DCU"]["gpus"] == 6
    printed = capsys.readouterr().out
    assert "fgd by vendor at 100 %: DCU: 6 GPUs" in printed
    assert "NVIDIA: 6 GPUs" in printed


def test_a_slice_on_another_vendors_device_is_counted_where_it_landed() -> None:
    fleet = traces.read_fleet(FLEET)
    counts = replaying.FleetVendors.of(fleet)
    (pod,) = traces.parse_pods(
        "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec\np,1000,1024,1,500,DCU\n"
    )
    landed = Slice(
        pod_uid="u",
        namespace="openb",
        pod="p",
        container="main",
        container_index=0,
        uuid="nv-0-gpu0",
        device_index=0,
        memory_mib=8192,
        cores_percent=50,
    )
    counts.arrive(pod)
    counts.place(
        pod,
        Placement(
            pod_uid="u", namespace="openb", pod="p", node="nv-0", slices=(landed,), charge=CHARGE
        ),
    )
    report = counts.report()
    assert report["NVIDIA"]["foreign_slices"] == 1
    assert report["NVIDIA"]["allocated"] == pytest.approx(500 / 6000)
    assert report["DCU"]["arrived"] == pytest.approx(500 / 6000)
    assert report["DCU"]["allocated"] == 0 and report["DCU"]["foreign_slices"] == 0
