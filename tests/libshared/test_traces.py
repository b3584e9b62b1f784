"""The Alibaba openb traces read into vslice's device and resource models."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from libshared import traces
from libshared.errors import TraceFormatError

REPO = Path(__file__).parents[2]

FLEET_HEADER = "sn,cpu_milli,memory_mib,gpu,model\n"
PODS_HEADER = "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos\n"


# --- the fleet --------------------------------------------------------------------------------


def test_a_fleet_row_becomes_a_node_with_numbered_gpus_of_its_model() -> None:
    text = FLEET_HEADER + "n-a,64000,262144,2,V100M16\nn-b,96000,393216,3,T4\n"
    nodes = traces.parse_fleet(text)
    assert [n.node for n in nodes] == ["n-a", "n-b"]
    a, b = nodes
    assert (a.cpu_milli, a.memory_mib, b.cpu_milli, b.memory_mib) == (64000, 262144, 96000, 393216)
    assert [d.uuid for d in a.devices] == ["n-a-gpu0", "n-a-gpu1"]
    assert [d.uuid for d in b.devices] == ["n-b-gpu0", "n-b-gpu1", "n-b-gpu2"]
    assert [d.index for d in b.devices] == [0, 1, 2]
    assert {d.type for d in a.devices} == {"V100M16"}
    assert {d.memory_mib for d in a.devices} == {traces.GPU_MEMORY_MIB["V100M16"]}
    assert {d.memory_mib for d in b.devices} == {traces.GPU_MEMORY_MIB["T4"]}
    assert all(d.split_count == traces.REPLAY_SPLIT_COUNT for d in a.devices + b.devices)


@pytest.mark.parametrize("model", sorted(traces.GPU_MEMORY_MIB))
def test_every_known_model_gets_its_memory(model: str) -> None:
    (node,) = traces.parse_fleet(FLEET_HEADER + f"n,1000,1024,1,{model}\n")
    assert node.devices[0].memory_mib == traces.GPU_MEMORY_MIB[model]


def test_a_cpu_only_node_needs_no_model() -> None:
    (node,) = traces.parse_fleet(FLEET_HEADER + "n,32000,65536,0,\n")
    assert node.devices == ()
    assert node.cpu_milli == 32000


def test_the_split_count_is_passed_to_every_device() -> None:
    (node,) = traces.parse_fleet(FLEET_HEADER + "n,1,1,2,A10\n", split_count=7)
    assert [d.split_count for d in node.devices] == [7, 7]


@pytest.mark.parametrize(
    ("rows", "line", "field", "value"),
    [
        ("ok,1,1,1,T4\nbad,1,1,1,H100\n", 3, "model", "H100"),
        ("bad,1,1,2,\n", 2, "model", ""),
        ("bad,lots,1,1,T4\n", 2, "cpu_milli", "lots"),
        ("ok,1,1,1,T4\nok2,1,1,1,T4\nbad,1,1.5,1,T4\n", 4, "memory_mib", "1.5"),
        ("bad,1,1,two,T4\n", 2, "gpu", "two"),
        ("bad,1,1,-1,T4\n", 2, "gpu", "-1"),
        ("bad,-1,1,1,T4\n", 2, "cpu_milli", "-1"),
        (",1,1,1,T4\n", 2, "sn", ""),
    ],
)
def test_a_bad_fleet_row_names_its_line_and_field(
    rows: str, line: int, field: str, value: str
) -> None:
    with pytest.raises(TraceFormatError) as info:
        traces.parse_fleet(FLEET_HEADER + rows, path="fleet.csv")
    err = info.value
    assert (err.path, err.line, err.field, err.value) == ("fleet.csv", line, field, value)
    assert f"fleet.csv:{line}:" in str(err)


# --- the pods ---------------------------------------------------------------------------------


def one_pod(row: str) -> traces.TracePod:
    (pod,) = traces.parse_pods(PODS_HEADER + row + "\n")
    return pod


def test_a_pod_row_keeps_its_cpu_memory_and_gpus() -> None:
    pod = one_pod("p-1,6000,12288,1,460,,LS")
    assert (pod.name, pod.cpu_milli, pod.memory_mib, pod.num_gpu, pod.gpu_milli) == (
        "p-1",
        6000,
        12288,
        1,
        460,
    )
    assert pod.gpu_spec == ()
    assert pod.milli_total == 460


@pytest.mark.parametrize(("gpu_milli", "percent"), [(460, 46), (500, 50), (10, 1), (999, 99)])
def test_a_sharing_pod_asks_a_tenth_of_its_milli_as_memory_and_core_percent(
    gpu_milli: int, percent: int
) -> None:
    req = one_pod(f"p,6000,12288,1,{gpu_milli},,LS").request("uid-1")
    (c,) = req.gpu_containers
    assert (c.gpu_count, c.memory_mib, c.memory_percent, c.cores_percent) == (
        1,
        0,
        percent,
        percent,
    )
    assert not c.exclusive
    assert (req.uid, req.name, req.cpu_milli, req.memory_mib) == ("uid-1", "p", 6000, 12288)


@pytest.mark.parametrize(("num_gpu", "gpu_milli"), [(1, 1000), (2, 1000), (8, 1000)])
def test_a_whole_gpu_pod_asks_whole_exclusive_cards(num_gpu: int, gpu_milli: int) -> None:
    pod = one_pod(f"p,12000,16384,{num_gpu},{gpu_milli},,LS")
    (c,) = pod.request("u").gpu_containers
    assert (c.gpu_count, c.memory_percent, c.cores_percent) == (num_gpu, 100, 100)
    assert c.exclusive
    assert pod.milli_total == 1000 * num_gpu


@pytest.mark.parametrize(
    ("spec", "types"),
    [
        ("V100M16|V100M32", ("V100M16", "V100M32")),
        ("G2", ("G2",)),
        ("", ()),
    ],
)
def test_the_gpu_spec_becomes_the_use_gputype_list(spec: str, types: tuple[str, ...]) -> None:
    req = one_pod(f"p,1000,1024,1,500,{spec},LS").request("u")
    assert req.use_types == types
    assert req.nouse_types == ()
    if types:
        assert req.type_allowed(types[-1])
        assert not req.type_allowed("T4")


@pytest.mark.parametrize("gpu_milli", ["0", "", "1000"])
def test_a_cpu_only_pod_has_no_gpu_containers(gpu_milli: str) -> None:
    pod = one_pod(f"p,4000,8192,0,{gpu_milli},,BE")
    req = pod.request("u")
    assert req.gpu_containers == ()
    assert pod.gpu_milli == 0
    assert pod.milli_total == 0
    assert (req.cpu_milli, req.memory_mib) == (4000, 8192)


@pytest.mark.parametrize("gpu_milli", ["0", "5"])
def test_a_one_gpu_pod_never_asks_for_zero_percent_of_a_card(gpu_milli: str) -> None:
    # ContainerRequest promises memory_percent in 1-100 when memory_mib is 0; a GPU pod
    # asking 0 percent would take a card's slot and no memory at all.
    try:
        pod = one_pod(f"p,1000,1024,1,{gpu_milli},,LS")
    except TraceFormatError as exc:
        assert exc.field == "gpu_milli"
        return
    (c,) = pod.request("u").gpu_containers
    assert 1 <= c.memory_percent <= 100


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ("p,1000,1024,1,1200,,LS", "gpu_milli"),
        ("p,1000,1024,2,500,,LS", "gpu_milli"),
        ("p,1000,1024,-1,0,,LS", "num_gpu"),
        ("p,1000,1024,,0,,LS", "num_gpu"),
        ("p,many,1024,1,500,,LS", "cpu_milli"),
        ("p,1000,1.5,1,500,,LS", "memory_mib"),
    ],
)
def test_a_bad_pod_row_names_its_line_and_field(row: str, field: str) -> None:
    text = PODS_HEADER + "ok,1000,1024,1,500,,LS\n" + row + "\n"
    with pytest.raises(TraceFormatError) as info:
        traces.parse_pods(text, path="pods.csv")
    assert (info.value.path, info.value.line, info.value.field) == ("pods.csv", 3, field)


# --- mixed vendors: Hygon DCUs ----------------------------------------------------------------


@pytest.mark.parametrize(("model", "memory_mib"), [("DCU-Z100", 32768), ("DCU-K100", 65536)])
def test_a_dcu_model_registers_dcus_of_its_memory(model: str, memory_mib: int) -> None:
    text = FLEET_HEADER + f"d,64000,262144,2,{model}\nn,64000,262144,1,T4\n"
    dcu, nvidia = traces.parse_fleet(text)
    assert {(d.type, d.vendor, d.memory_mib) for d in dcu.devices} == {(model, "DCU", memory_mib)}
    assert {d.vendor for d in nvidia.devices} == {"NVIDIA"}


def test_a_dcu_model_cannot_be_put_in_mig_mode() -> None:
    text = "sn,cpu_milli,memory_mib,gpu,model,mode\nd,1000,1024,1,DCU-Z100,mig\n"
    with pytest.raises(TraceFormatError) as info:
        traces.parse_fleet(text)
    assert (info.value.field, info.value.value) == ("model", "DCU-Z100")


@pytest.mark.parametrize(
    ("spec", "vendor"),
    [("DCU", "DCU"), ("DCU-Z100", "DCU"), ("DCU-Z100|DCU-K100", "DCU"), ("V100M16", "NVIDIA")],
)
def test_a_pod_naming_dcus_in_its_gpu_spec_asks_dcus(spec: str, vendor: str) -> None:
    assert one_pod(f"p,1000,1024,1,500,{spec},LS").vendor == vendor


def test_a_sharing_dcu_pod_asks_its_share_of_the_smallest_named_card_in_mib() -> None:
    pod = one_pod("p,4000,8192,1,250,DCU-K100|DCU-Z100,LS")
    req = pod.request("u")
    assert req.containers[0].gpu_count == 0  # no NVIDIA GPU
    (c,) = req.gpu_containers
    assert (c.vendor, c.gpu_count, c.memory_mib, c.memory_percent, c.cores_percent) == (
        "DCU",
        1,
        32768 // 4,
        0,
        25,
    )
    assert req.selectors("DCU").use_types == ("DCU-K100", "DCU-Z100")
    assert req.use_types == ()  # the NVIDIA selector stays unset
    assert req.type_allowed("DCU-Z100", "DCU")
    assert not req.type_allowed("DCU-X9", "DCU")


def test_a_sharing_pod_asking_any_dcu_is_measured_on_the_smallest_dcu() -> None:
    (c,) = one_pod("p,4000,8192,1,500,DCU,LS").request("u").gpu_containers
    assert c.memory_mib == min(traces.DCU_MEMORY_MIB.values()) // 2


def test_a_whole_dcu_pod_asks_whole_exclusive_dcus() -> None:
    (c,) = one_pod("p,4000,8192,2,1000,DCU-Z100,LS").request("u").gpu_containers
    assert (c.vendor, c.gpu_count, c.memory_percent, c.cores_percent) == ("DCU", 2, 100, 100)


def test_a_gpu_spec_naming_both_vendors_is_refused_naming_it() -> None:
    text = PODS_HEADER + "ok,1000,1024,1,500,,LS\np,1000,1024,1,500,V100M16|DCU-Z100,LS\n"
    with pytest.raises(TraceFormatError) as info:
        traces.parse_pods(text, path="pods.csv")
    assert (info.value.line, info.value.field, info.value.value) == (
        3,
        "gpu_spec",
        "V100M16|DCU-Z100",
    )
    assert "two vendors" in str(info.value)


# --- the real trace ---------------------------------------------------------------------------


def test_the_default_openb_fleet_has_1213_nodes_and_6212_gpus() -> None:
    root = Path(os.environ.get("VSLICE_TRACES", "../shared/traces/openb"))
    if not root.is_absolute():
        root = REPO / root
    if not root.is_dir() and not os.environ.get("CI"):  # CI always has ../shared
        pytest.skip(f"trace directory {root} is missing")
    path = root / "openb_node_list_gpu_node.csv"
    nodes = traces.read_fleet(path)
    assert len(nodes) == 1213
    assert sum(len(n.devices) for n in nodes) == 6212
    # every row and its GPU column, read independently of the parser
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert [n.node for n in nodes] == [r["sn"] for r in rows]
    assert [len(n.devices) for n in nodes] == [int(r["gpu"]) for r in rows]
    uuids = [d.uuid for n in nodes for d in n.devices]
    assert len(set(uuids)) == len(uuids)


# --- the scaled fleet and trace ---------------------------------------------------------------


@pytest.mark.parametrize("factor", [1, 2, 10])
def test_a_scaled_fleet_repeats_every_node_with_fresh_names_and_the_same_devices(
    factor: int,
) -> None:
    text = FLEET_HEADER + "n-a,64000,262144,2,V100M16\nn-b,96000,393216,8,T4\n"
    nodes = traces.parse_fleet(traces.scaled_fleet(text, factor))
    assert len(nodes) == 2 * factor
    assert len({n.node for n in nodes}) == 2 * factor
    assert {n.node for n in nodes}.isdisjoint({"n-a", "n-b"})
    assert sum(len(n.devices) for n in nodes) == 10 * factor
    by_name = {n.node: n for n in nodes}
    for copy in range(factor):
        b = by_name[f"n-b-x{copy}"]
        assert (b.cpu_milli, b.memory_mib, len(b.devices)) == (96000, 393216, 8)
        assert {d.type for d in b.devices} == {"T4"}


@pytest.mark.parametrize("factor", [1, 3])
def test_a_scaled_pod_list_keeps_every_column_and_the_shape_frequencies(factor: int) -> None:
    text = PODS_HEADER + "p1,4000,1024,1,500,V100M16|V100M32,LS\np2,8000,2048,2,1000,,BE\n"
    scaled = traces.scaled_pods(text, factor)
    rows = list(csv.DictReader(scaled.splitlines()))
    assert [r["name"] for r in rows[:2]] == ["p1-x0", "p2-x0"]
    assert {r["qos"] for r in rows} == {"LS", "BE"}
    pods = traces.parse_pods(scaled)
    assert len(pods) == 2 * factor
    shapes = sorted((p.cpu_milli, p.num_gpu, p.gpu_milli, p.gpu_spec) for p in pods)
    assert shapes == sorted([(4000, 1, 500, ("V100M16", "V100M32")), (8000, 2, 1000, ())] * factor)


@pytest.mark.parametrize("factor", [0, -1, 1.5, True])
def test_a_scale_factor_below_one_or_not_an_integer_is_refused_naming_it(factor) -> None:
    with pytest.raises(ValueError, match=f"factor {factor!r}"):
        traces.scaled_fleet(FLEET_HEADER + "n,1000,1024,1,T4\n", factor)


def test_a_fleet_row_without_a_name_is_refused_when_scaling() -> None:
    with pytest.raises(TraceFormatError, match="sn"):
        traces.scaled_fleet(FLEET_HEADER + ",1000,1024,1,T4\n", 2)


def test_a_pod_row_without_a_name_is_refused_when_scaling() -> None:
    with pytest.raises(TraceFormatError, match="name"):
        traces.scaled_pods(PODS_HEADER + ",4000,1024,1,500,,LS\n", 2)


def test_write_scaled_writes_both_files_under_their_names(tmp_path: Path) -> None:
    fleet = tmp_path / "openb_node_list_gpu_node.csv"
    pods = tmp_path / "openb_pod_list_default.csv"
    fleet.write_text(FLEET_HEADER + "n,1000,1024,1,T4\n")
    pods.write_text(PODS_HEADER + "p,1000,1024,1,500,,LS\n")
    out_fleet, out_pods = traces.write_scaled(fleet, pods, tmp_path / "x4", 4)
    assert (out_fleet.name, out_pods.name) == (fleet.name, pods.name)
    assert len(traces.read_fleet(out_fleet)) == 4
    assert len(traces.read_pods(out_pods)) == 4


@pytest.mark.skipif(
    not Path(os.environ.get("VSLICE_TRACES", REPO.parent / "shared/traces/openb")).is_dir(),
    reason="openb traces not present",
)
def test_ten_times_openb_is_12130_nodes_and_62120_gpus() -> None:
    tdir = Path(os.environ.get("VSLICE_TRACES", REPO.parent / "shared/traces/openb"))
    text = (tdir / "openb_node_list_gpu_node.csv").read_text()
    nodes = traces.parse_fleet(traces.scaled_fleet(text, 10))
    assert (len(nodes), sum(len(n.devices) for n in nodes)) == (12130, 62120)
