"""``vslice replay`` over the bus: the same pods arrive as in process, through admission
and the scheduler replicas, and one replica at concurrency 1 places exactly what the
in-process replay places."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from libshared import traces
from libshared.resources import ResourceSettings, parse_pod
from libshared.traces import TracePod
from vslice import cli, replays_bus, replays_local

NODE_HEADER = "sn,cpu_milli,memory_mib,gpu,model"
MIXED = Path(__file__).parents[1] / "scheduler" / "traces"  # the mixed-vendor fixture
POD_HEADER = (
    "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,creation_time,"
    "deletion_time,scheduled_time"
)


def small_trace(tmp_path: Path) -> tuple[str, str]:
    """A 12-node fleet and 300 pods of every kind the openb trace has, in its CSV format."""
    rng = random.Random(7)
    nodes = [NODE_HEADER]
    for i in range(12):
        gpus, model = ((2, "V100M16"), (4, "T4"), (8, "V100M32"))[i % 3]
        nodes.append(f"node-{i:02d},64000,262144,{gpus},{model}")
    pods = [POD_HEADER]
    for i in range(300):
        kind = rng.random()
        if kind < 0.1:
            num, milli = 0, 0
        elif kind < 0.6:
            num, milli = 1, rng.choice((100, 250, 300, 500, 700))
        elif kind < 0.9:
            num, milli = 1, 1000
        else:
            num, milli = rng.choice((2, 4, 8)), 1000
        spec = rng.choice(("", "", "T4", "V100M16|V100M32"))
        cpu = rng.choice((1000, 4000, 8000))
        pods.append(f"pod-{i:03d},{cpu},8192,{num},{milli},{spec},LS,Running,0,0,0")
    fleet, trace = tmp_path / "nodes.csv", tmp_path / "pods.csv"
    fleet.write_text("\n".join(nodes) + "\n")
    trace.write_text("\n".join(pods) + "\n")
    return str(trace), str(fleet)


@pytest.mark.parametrize(
    "pod",
    [
        TracePod("a", 4000, 8192, 1, 250, ()),
        TracePod("b", 8000, 16384, 1, 1000, ("T4",)),
        TracePod("c", 1000, 1024, 4, 1000, ("V100M16", "V100M32")),
        TracePod("d", 32000, 65536, 1, 10, ()),
        TracePod("e", 4000, 8192, 1, 250, ("DCU-Z100",), "DCU"),
        TracePod("f", 4000, 8192, 1, 300, ("DCU",), "DCU"),
        TracePod("g", 8000, 16384, 2, 1000, ("DCU-K100",), "DCU"),
        TracePod("h", 8000, 16384, 1, 1000, (), "DCU"),
    ],
)
def test_admission_turns_a_trace_pods_spec_into_the_in_process_request(pod: TracePod) -> None:
    spec = replays_bus.pod_spec(pod, "uid-1")
    assert parse_pod(spec, settings=ResourceSettings()) == pod.request("uid-1")


@pytest.mark.parametrize("policy", ["fgd", "bestfit"])
def test_one_replica_at_concurrency_1_places_what_the_in_process_replay_places(
    tmp_path: Path, policy: str
) -> None:
    trace, fleet = small_trace(tmp_path)
    (local,) = replays_local.replay_in_process(trace, fleet, [policy], [3], jobs=1, quiet=True)
    (bus,) = replays_bus.replay_over_bus(
        trace, fleet, [policy], [3], replicas=1, concurrency=1, quiet=True
    )
    assert bus["pods_total"] == local["pods_total"] > 50
    assert 0 < bus["pods_placed"] == local["pods_placed"] < bus["pods_total"]
    assert bus["curve"] == local["curve"]
    assert bus["alloc_at_100"] == local["alloc_at_100"]
    assert bus["replicas"] == 1 and bus["conflicts"] == 0
    assert bus["pods_per_s"] > 0 and 0 < bus["latency_ms_p50"] <= bus["latency_ms_p99"]


def test_a_dcu_pods_nouse_uuids_become_hygons_annotation() -> None:
    pod = TracePod("e", 4000, 8192, 1, 250, ("DCU-Z100",), "DCU")
    spec = replays_bus.pod_spec(pod, "uid-1", nouse_uuids=("a", "b"))
    assert spec["metadata"]["annotations"] == {
        "hygon.com/use-dcutype": "DCU-Z100",
        "hygon.com/nouse-gpuuuid": "a,b",
    }
    request = parse_pod(spec, settings=ResourceSettings())
    assert request.selectors("DCU").nouse_uuids == ("a", "b")
    assert request.nouse_uuids == ()


def test_on_a_mixed_vendor_fleet_the_bus_places_what_the_in_process_replay_places() -> None:
    trace, fleet = str(MIXED / "mixed_pods.csv"), str(MIXED / "mixed_fleet.csv")
    (local,) = replays_local.replay_in_process(trace, fleet, ["fgd"], [42], jobs=1, quiet=True)
    (bus,) = replays_bus.replay_over_bus(
        trace, fleet, ["fgd"], [42], replicas=1, concurrency=1, quiet=True
    )
    assert 0 < bus["pods_placed"] == local["pods_placed"] < bus["pods_total"]
    assert bus["curve"] == local["curve"]
    assert set(bus["by_vendor"]) == {"DCU", "NVIDIA"}
    for vendor in ("DCU", "NVIDIA"):
        got, want = bus["by_vendor"][vendor], local["by_vendor"][vendor]
        assert got["foreign_slices"] == want["foreign_slices"] == 0
        assert got["arrived"] == want["arrived"]
        assert got["pods_placed"] == want["pods_placed"] > 0
        assert got["allocated"] == pytest.approx(want["allocated"])


def test_the_cli_replays_over_two_replicas_and_writes_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace, fleet = small_trace(tmp_path)
    out = tmp_path / "report.json"
    argv = ["replay", trace, "--fleet", fleet, "--policy", "fgd", "--seeds", "5"]
    argv += ["--concurrency", "8", "--quiet", "--json", str(out)]
    assert cli.main(argv) == 0
    report = json.loads(out.read_text())
    local = replays_local.replay_in_process(trace, fleet, ["fgd"], [5], jobs=1, quiet=True)[0]
    assert report["replicas"] == 2 and report["concurrency"] == 8
    assert report["pods_total"] == local["pods_total"]
    # concurrent arrivals may be decided in another order, and a replica's view may trail
    # the other's last commit by one pod: on a 92-pod trace one changed decision moves
    # several pods (72 to 77 placed against 73 in process, 84 on a loaded machine; the
    # 1 % bound is for the full openb trace), so 15 % here
    assert abs(report["pods_placed"] - local["pods_placed"]) <= 0.15 * local["pods_total"]
    assert report["conflicts"] >= 0 and "over the bus" in capsys.readouterr().out
    assert report["conflict_rate"] == report["conflicts"] / report["pods_placed"]
    assert report["cpu_ms_per_pod"] > 0  # every process of the stack, from /proc
    assert len(traces.read_pods(trace)) == 300


def untyped_trace(tmp_path: Path, *, nodes: int = 24, pods: int = 400) -> tuple[str, str]:
    """A fleet of ``nodes`` like nodes of 4 GPUs and ``pods`` one-GPU pods of any type:
    where every node could take every pod, so shards decide the races."""
    rng = random.Random(11)
    fleet_rows = [NODE_HEADER, *(f"node-{i:02d},64000,262144,4,T4" for i in range(nodes))]
    pod_rows = [POD_HEADER]
    for i in range(pods):
        milli = rng.choice((250, 500, 1000))
        pod_rows.append(f"pod-{i:03d},1000,8192,1,{milli},,LS,Running,0,0,0")
    fleet, trace = tmp_path / "nodes.csv", tmp_path / "pods.csv"
    fleet.write_text("\n".join(fleet_rows) + "\n")
    trace.write_text("\n".join(pod_rows) + "\n")
    return str(trace), str(fleet)


def test_two_partitioned_hami_replicas_lose_far_fewer_ledger_races_than_replicas_alone(
    tmp_path: Path,
) -> None:
    trace, fleet = untyped_trace(tmp_path)
    rates = {}
    for partitioned in (False, True):
        # alone: every replica decides as if it were the only one (as before shards)
        alone = [] if partitioned else ["--replica-count", "1", "--replica-index", "0"]
        result, driven = replays_bus.run_seed(
            trace,
            fleet,
            policy="hami",
            seed=3,
            replicas=2,
            concurrency=8,
            quiet=True,
            scheduler_args=alone,
        )
        assert result.pods_placed > 100
        rates[partitioned] = driven.stats.conflicts / result.pods_placed
    assert rates[True] <= 0.05 and rates[True] <= rates[False] / 3, rates
