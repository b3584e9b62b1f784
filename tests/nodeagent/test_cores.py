"""The node agent's pure decisions: registration, preparing a slice, usage and escapes."""

from __future__ import annotations

import logging
from pathlib import Path

import msgspec
import pytest

from libshared import annotations, events, probes
from libshared.ledgers import PodCharge, Slice
from services.nodeagent import app, settings
from services.nodeagent.adapters import kube, loops
from services.nodeagent.adapters.slicing import Slicer
from services.nodeagent.core import nodeconfigs, preparing, registrations, sharedcaches, usages
from services.nodeagent.core.registrations import Gpu, Scaling
from services.nodeagent.core.sharedcaches import ProcessSlot, SharedCache
from vslice import running

MIB = 1 << 20


def gpu(i: int, memory_mib: int = 16000) -> Gpu:
    return Gpu(uuid=f"GPU-{i}", index=i, model="T4", type="NVIDIA-T4", memory_mib=memory_mib)


def slice_(uuid: str = "GPU-0", *, memory_mib: int = 512, cores: int = 0, index: int = 0) -> Slice:
    return Slice(
        pod_uid="p1",
        namespace="ns",
        pod="pod1",
        container="main",
        container_index=0,
        uuid=uuid,
        device_index=index,
        memory_mib=memory_mib,
        cores_percent=cores,
    )


@pytest.mark.parametrize(
    ("scaling", "memory_mib", "cores", "split"),
    [
        (Scaling(), 16000, 100, 10),
        (Scaling(split_count=4, memory_scaling=2.0), 32000, 100, 4),
        (Scaling(memory_scaling=0.5, core_scaling=1.5), 8000, 150, 10),
    ],
)
def test_registration_scales_memory_and_cores_and_splits_as_configured(
    scaling: Scaling, memory_mib: int, cores: int, split: int
) -> None:
    reg = registrations.node_devices("n1", [gpu(1), gpu(0)], scaling=scaling)
    assert [d.uuid for d in reg.devices] == ["GPU-0", "GPU-1"]
    assert {(d.memory_mib, d.cores_percent, d.split_count) for d in reg.devices} == {
        (memory_mib, cores, split)
    }


def test_a_device_with_a_fault_registers_unhealthy_and_the_hami_annotation_says_so() -> None:
    reg = registrations.node_devices(
        "n1", [gpu(0), gpu(1)], scaling=Scaling(), unhealthy=frozenset({"GPU-1"})
    )
    assert [d.healthy for d in reg.devices] == [True, False]
    decoded = annotations.decode_node_devices(registrations.hami_register(reg))
    assert decoded == reg.devices


@pytest.mark.parametrize(
    ("xid", "fault"),
    [
        (13, False),
        (31, False),
        (43, False),
        (45, False),
        (68, False),
        (109, False),
        (48, True),
        (79, True),
    ],
)
def test_application_xids_leave_a_device_healthy_and_others_do_not(xid: int, fault: bool) -> None:
    assert registrations.is_device_fault(xid) is fault


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"split_count": 0}, "deviceSplitCount"),
        ({"memory_scaling": 0.0}, "deviceMemoryScaling"),
        ({"core_scaling": float("nan")}, "deviceCoreScaling"),
    ],
)
def test_bad_scaling_is_refused_naming_the_setting(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Scaling(**kwargs)


def test_two_gpus_with_one_uuid_are_refused() -> None:
    with pytest.raises(ValueError, match="UUID appears twice"):
        registrations.node_devices("n1", [gpu(0), gpu(0)], scaling=Scaling())


LAYOUT = preparing.Layout(root="/host", libvgpu="/host/lib/libvgpu.so")


def placement(*slices: Slice) -> events.Placement:
    return events.Placement(
        pod_uid="p1",
        namespace="ns",
        pod="pod1",
        node="n1",
        slices=slices,
        charge=PodCharge(pod_uid="p1"),
    )


def test_a_container_gets_hami_cores_variables_its_cache_file_and_libvgpu() -> None:
    (plan,) = preparing.plan(
        placement(slice_("GPU-b", memory_mib=2000, cores=30, index=1), slice_("GPU-a", index=0)),
        LAYOUT,
    )
    assert plan.directory == "/host/containers/p1_main"
    env = plan.env
    assert env["NVIDIA_VISIBLE_DEVICES"] == env["CUDA_VISIBLE_DEVICES"] == "GPU-a,GPU-b"
    assert (env["CUDA_DEVICE_MEMORY_LIMIT_0"], env["CUDA_DEVICE_MEMORY_LIMIT_1"]) == (
        "512m",
        "2000m",
    )
    assert env["CUDA_DEVICE_SM_LIMIT"] == "30"
    assert env["CUDA_DEVICE_MEMORY_SHARED_CACHE"] == "/host/containers/p1_main/vgpu.cache"
    assert env["LD_PRELOAD"] == "/host/lib/libvgpu.so"
    assert env["GPU_CORE_UTILIZATION_POLICY"] == "default"
    assert "LD_LIBRARY_PATH" not in env
    cache = sharedcaches.decode(plan.cache_bytes)
    assert [d.limit_bytes for d in cache.devices[:3]] == [512 * MIB, 2000 * MIB, 0]
    # libvgpu reads CUDA_DEVICE_SM_LIMIT for every device: the file says the same
    assert {d.sm_limit_percent for d in cache.devices} == {30}


def test_on_mock_gpus_the_environment_puts_the_mock_driver_first() -> None:
    mock = preparing.MockDriver(library_dir="/m", state="/host/mock.state", devices="GPU-0:2048")
    layout = preparing.Layout(root="/host", libvgpu="/l.so", sm_policy="force", mock=mock)
    (plan,) = preparing.plan(placement(slice_(cores=100)), layout)
    assert plan.env["LD_LIBRARY_PATH"] == "/m"
    assert plan.env["VSLICE_MOCKGPU_STATE"] == "/host/mock.state"
    assert plan.env["VSLICE_MOCKGPU_DEVICES"] == "GPU-0:2048"
    # the percent as asked, and the policy that decides whether 100 % is limited
    decoded = sharedcaches.decode(plan.cache_bytes)
    assert (decoded.devices[0].sm_limit_percent, decoded.sm_policy) == (100, "force")
    assert plan.env["CUDA_DEVICE_SM_LIMIT"] == "100"


@pytest.mark.parametrize(
    ("uid", "container", "key"),
    [
        ("p1", "main", "p1_main"),
        (
            "0b4d6f3e-1c2a-4e5f-9a8b-7c6d5e4f3a2b",
            "main",
            "0b4d6f3e-1c2a-4e5f-9a8b-7c6d5e4f3a2b_main",
        ),
        ("a/../b", "c d", "a%2f..%2fb_c%20d"),
        ("x", "..", "x_%2e."),
        ("a_b", "main", "a%5fb_main"),
        ("A", "main", "%41_main"),
    ],
)
def test_a_container_key_is_one_path_component(uid: str, container: str, key: str) -> None:
    assert preparing.container_key(uid, container) == key
    assert "/" not in key and not key.startswith(".")
    assert preparing.parse_key(key) == (uid, container)


@pytest.mark.parametrize(
    "uids",
    [
        ("a/b", "a-b"),
        ("tenant/a", "tenant-a"),
        ("Pod-1", "pod-1", "POD-1"),
        ("a_b", "a-b", "a.b", "a b", "a:b", "a%2fb", "a%b"),
    ],
)
def test_pod_uids_that_differ_only_in_case_or_punctuation_get_different_directories(
    uids: tuple[str, ...],
) -> None:
    keys = {preparing.container_key(u, "main") for u in uids}
    assert len(keys) == len(uids)
    assert len({k.lower() for k in keys}) == len(uids)  # also on a case-insensitive disk


@pytest.mark.parametrize(
    ("uid", "container"),
    [
        ("%", "main"),
        ("%25", "%"),
        ("_", "_"),
        ("..", "."),
        (".hidden", "c"),
        ("ünï/cödé", "ü"),
        ("a\x00b", "c\nd"),
        ("tenant/a", "main_1"),
        ("-", "-"),
    ],
)
def test_a_container_key_names_exactly_one_pod_and_container(uid: str, container: str) -> None:
    key = preparing.container_key(uid, container)
    assert preparing.parse_key(key) == (uid, container)
    assert "/" not in key and "\0" not in key and key not in (".", "..")


@pytest.mark.parametrize("name", ["a-b-main", "a_b_main", "A_main", "x_%zz", "x_", "p%2_m"])
def test_a_name_no_pod_gives_is_not_read_as_a_key(name: str) -> None:
    assert preparing.parse_key(name) is None


def test_a_key_too_long_for_a_path_component_is_refused_naming_its_length() -> None:
    with pytest.raises(ValueError, match="more than 255"):
        preparing.container_key("/" * 90, "main")


def test_a_slice_without_memory_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match="memory_mib=0"):
        preparing.plan(placement(slice_(memory_mib=0)), LAYOUT)


def test_a_new_cache_file_decodes_to_its_limits_and_bad_limits_are_refused() -> None:
    data = sharedcaches.encode_new(limits_bytes=[3 * MIB], sm_limits_percent=[40], creator_pid=9)
    cache = sharedcaches.decode(data)
    assert (cache.devices[0].limit_bytes, cache.devices[0].sm_limit_percent) == (3 * MIB, 40)
    assert cache.creator_pid == 9 and cache.processes == ()
    with pytest.raises(ValueError, match="sm_limits_percent"):
        sharedcaches.encode_new(limits_bytes=[1], sm_limits_percent=[101])
    with pytest.raises(ValueError, match="limits_bytes"):
        sharedcaches.encode_new(limits_bytes=[1] * 17, sm_limits_percent=[])


# -- usage and the host-side check ---------------------------------------------------------


def container(key: str = "p1_main", memory_mib: int = 512) -> usages.Container:
    return usages.Container(
        key=key,
        pod_uid="p1",
        namespace="ns",
        pod="pod1",
        container="main",
        slices=(slice_("GPU-0", memory_mib=memory_mib),),
    )


def cache(*slots: tuple[int, int], used: int | None = None, limit_mib: int = 512) -> SharedCache:
    base = sharedcaches.decode(
        sharedcaches.encode_new(limits_bytes=[limit_mib * MIB], sm_limits_percent=[0])
    )
    dev0 = base.devices[0]
    charged = sum(c for _, c in slots) if used is None else used
    return SharedCache(
        version=1,
        sm_policy="default",
        creator_pid=0,
        created_ns=0,
        devices=(
            sharedcaches.DeviceUsage(
                index=0,
                limit_bytes=dev0.limit_bytes,
                used_bytes=charged,
                sm_limit_percent=0,
                observed_busy_ns=0,
            ),
            *base.devices[1:],
        ),
        processes=tuple(
            ProcessSlot(
                slot=i,
                pid=pid,
                start_ticks=1,
                last_kernel_ns=2_000_000_000,
                launches=1,
                charged_bytes=(c,) + (0,) * 15,
            )
            for i, (pid, c) in enumerate(slots)
        ),
    )


DEVICE = usages.DeviceReading(uuid="GPU-0", index=0, type="T", used_bytes=0, total_bytes=8 * MIB)


@pytest.mark.parametrize(
    ("slot_pids", "host_pid_of", "expected"),
    [
        pytest.param([1, 7], {1: 4001, 7: 4007}, [4001, 4007], id="a-pod's-own-pid-namespace"),
        pytest.param([1, 7], {1: 4001}, [4001, 7], id="a-process-not-tied-keeps-its-pid"),
        pytest.param([300], {300: 300}, [300], id="the-host-namespace-maps-to-itself"),
    ],
)
def test_cache_slots_are_read_under_the_host_pids_nvml_names(
    slot_pids: list[int], host_pid_of: dict[int, int], expected: list[int]
) -> None:
    before = cache(*[(pid, 64 * MIB) for pid in slot_pids])
    after = usages.with_host_pids(before, host_pid_of)
    assert [p.pid for p in after.processes] == expected
    assert [p.charged_bytes for p in after.processes] == [p.charged_bytes for p in before.processes]


def test_usage_shows_each_container_slice_charged_against_its_limit() -> None:
    found = usages.report(
        node="n1",
        at=5.0,
        containers=[container()],
        caches={"p1_main": cache((100, 64 * MIB))},
        devices=[DEVICE],
        processes=[
            usages.ProcessReading(pid=100, uuid="GPU-0", used_bytes=64 * MIB, sm_percent=20.0)
        ],
        owners={},
    )
    (row,) = found.containers
    assert (row.pod_uid, row.uuid, row.used_bytes, row.limit_bytes) == (
        "p1",
        "GPU-0",
        64 * MIB,
        512 * MIB,
    )
    assert row.pids == (100,) and row.utilization_percent == 20.0 and row.last_kernel_at == 2.0
    assert found.escapes == () and found.problems == ()
    assert events.NODE_USAGE.decode(events.ENCODER.encode(found)) == found


def test_the_report_carries_each_devices_gpu_and_memory_controller_utilization() -> None:
    reading = usages.DeviceReading(
        uuid="GPU-0",
        index=0,
        type="T",
        used_bytes=MIB,
        total_bytes=8 * MIB,
        utilization_percent=70.0,
        memory_utilization_percent=35.0,
    )
    found = usages.report(
        node="n1", at=1.0, containers=[], caches={}, devices=[reading], processes=[], owners={}
    )
    (device,) = found.devices
    assert (device.utilization_percent, device.memory_utilization_percent) == (70.0, 35.0)


def test_an_unreadable_cache_is_a_problem_and_its_container_gets_no_row() -> None:
    found = usages.report(
        node="n1",
        at=0.0,
        containers=[container()],
        caches={"p1_main": "magic is 0x0"},
        devices=[],
        processes=[],
        owners={},
    )
    assert found.containers == () and found.problems == ("p1_main: magic is 0x0",)


@pytest.mark.parametrize(
    ("slots", "nvml", "owners", "escaped"),
    [
        # charged by libvgpu and within the slice: nothing
        ([(100, 400 * MIB)], [(100, 400 * MIB)], {}, []),
        # a process of the container without libvgpu, over the slice
        ([], [(200, 600 * MIB)], {200: "p1_main"}, [(200, 512 * MIB, "p1")]),
        # without libvgpu but within the slice: not (yet) an escape
        ([], [(200, 300 * MIB)], {200: "p1_main"}, []),
        # two processes: the charged one is fine, the uncharged one pushed it over
        (
            [(100, 400 * MIB)],
            [(100, 400 * MIB), (200, 300 * MIB)],
            {200: "p1_main"},
            [(200, 512 * MIB, "p1")],
        ),
        # a process in no slice at all: reported, with no limit and no pod
        ([], [(300, 10 * MIB)], {}, [(300, 0, "")]),
    ],
)
def test_the_host_side_check_finds_processes_past_their_slice(
    slots: list[tuple[int, int]],
    nvml: list[tuple[int, int]],
    owners: dict[int, str],
    escaped: list[tuple[int, int, str]],
) -> None:
    found = usages.report(
        node="n1",
        at=0.0,
        containers=[container()],
        caches={"p1_main": cache(*slots)},
        devices=[DEVICE],
        processes=[usages.ProcessReading(pid=p, uuid="GPU-0", used_bytes=b) for p, b in nvml],
        owners=owners,
    )
    assert [(e.pid, e.limit_bytes, e.pod_uid) for e in found.escapes] == escaped
    assert usages.to_kill(found.escapes) == sorted(p for p, _, uid in escaped if uid)


def test_a_margin_forgives_what_nvml_shows_beyond_the_charge() -> None:
    proc = usages.ProcessReading(pid=100, uuid="GPU-0", used_bytes=700 * MIB)
    args = {
        "node": "n1",
        "at": 0.0,
        "containers": [container()],
        "caches": {"p1_main": cache((100, 400 * MIB))},
        "devices": [],
        "processes": [proc],
        "owners": {},
    }
    assert len(usages.report(**args).escapes) == 1
    assert usages.report(**args, margin_bytes=300 * MIB).escapes == ()


# -- vslice run's pure parts --------------------------------------------------------------


def test_vslice_run_asks_for_hami_resources_on_this_nodes_gpus() -> None:
    spec = running.pod_spec(
        running.SliceRequest(memory_mib=512, cores_percent=30, gpu_type="NVIDIA-T4"),
        uid="run-1",
        uuids=["GPU-a", "GPU-b"],
    )
    limits = spec["spec"]["containers"][0]["resources"]["limits"]
    assert limits == {
        "nvidia.com/gpu": "1",
        "nvidia.com/gpumem": "512",
        "nvidia.com/gpucores": "30",
    }
    annos = spec["metadata"]["annotations"]
    assert annos == {"nvidia.com/use-gpuuuid": "GPU-a,GPU-b", "nvidia.com/use-gputype": "NVIDIA-T4"}


def test_the_slice_environment_goes_first_on_path_lists_and_wins_elsewhere() -> None:
    env = running.command_env(
        {"LD_PRELOAD": "/mine.so", "LD_LIBRARY_PATH": "/a", "CUDA_VISIBLE_DEVICES": "0", "X": "1"},
        {"LD_PRELOAD": "/v.so", "LD_LIBRARY_PATH": "/m", "CUDA_VISIBLE_DEVICES": "GPU-a"},
    )
    assert env == {
        "LD_PRELOAD": "/v.so /mine.so",
        "LD_LIBRARY_PATH": "/m:/a",
        "CUDA_VISIBLE_DEVICES": "GPU-a",
        "X": "1",
    }


def test_a_host_root_makes_a_real_slice_agent_and_bad_values_name_their_flag(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parsed = settings.parse(
        [
            "--host-root",
            "/tmp/h",
            "--memory-scaling",
            "1.5",
            "--split-count",
            "4",
            "--enforce",
            "kill",
        ],
        environ={},
    )
    assert parsed.slices is not None
    assert parsed.slices.scaling == Scaling(split_count=4, memory_scaling=1.5)
    assert parsed.slices.enforce == "kill"
    assert parsed.slices.mock_state_path == "/tmp/h/mockgpu.state"
    assert parsed.slices.node_config is None
    assert settings.parse([], environ={}).slices is None
    for argv, flag in (
        (["--host-root", "/h", "--memory-scaling", "0"], "deviceMemoryScaling"),
        (["--host-root", "/h", "--usage-interval", "0"], "--usage-interval"),
        (["--host-root", "/h", "--escape-margin-mib", "-1"], "--escape-margin-mib"),
        (["--node-config", "/c.json"], "--node-config needs --host-root"),
        (["--host-root", "/h", "--node-config", "/nonexistent/c.json"], "/nonexistent/c.json"),
        (["--host-root", "/h", "--node-config", "/c", "--node-config-poll", "0"], "poll"),
    ):
        with pytest.raises(SystemExit):
            settings.parse(argv, environ={})
        assert flag in capsys.readouterr().err


def test_mock_gpus_come_from_the_device_list_else_the_first_node_of_a_fleet_file(
    tmp_path: Path,
) -> None:
    fleet = tmp_path / "nodes.csv"
    fleet.write_text("sn,cpu_milli,memory_mib,gpu,model\nn-a,64000,262144,2,T4\n")
    no_nvml = ["--host-root", str(tmp_path), "--backend", "mock", "--mock-dir", str(tmp_path)]
    parsed = settings.parse([*no_nvml, "--fleet", str(fleet)], environ={})
    assert parsed.slices is not None
    found = app.open_gpus(parsed, parsed.slices).discover()
    assert [(g.index, g.type) for g in found] == [(0, "T4"), (1, "T4")]
    assert len({g.uuid for g in found}) == 2
    listed = settings.parse([*no_nvml, "--devices", "GPU-x:1000"], environ={})
    assert listed.slices is not None
    assert [(g.uuid, g.memory_mib) for g in app.open_gpus(listed, listed.slices).discover()] == [
        ("GPU-x", 1000)
    ]


def test_a_usage_report_over_its_bounds_is_clipped_saying_what_was_left_out() -> None:
    row = events.ContainerUsage(
        pod_uid="p",
        namespace="default",
        pod="p",
        container="main",
        container_index=0,
        uuid="GPU-0",
        device_index=0,
        used_bytes=1,
        limit_bytes=2,
        pids=tuple(range(1, events.MAX_USAGE_PIDS + 3)),
    )
    escape = events.Escape(pid=7, uuid="GPU-0", used_bytes=3, limit_bytes=2)
    usage = events.NodeUsage(
        node="n1",
        at=1.0,
        containers=(row,) * (events.MAX_USAGE_ROWS + 1),
        escapes=(escape,) * (events.MAX_ESCAPES + 4),
        problems=("k: " + "x" * events.MAX_PROBLEM,) * (events.MAX_PROBLEMS + 5),
    )
    kept, left = usages.clipped(usage)
    assert left == [
        "1 container rows",
        f"{2 * events.MAX_USAGE_ROWS} pids of {events.MAX_USAGE_ROWS} rows",
        "4 escapes",
        "5 problems",
        "the tail of problems over the length bound",
    ]
    assert events.NODE_USAGE.decode(events.ENCODER.encode(kept)) == kept
    assert kept.containers[0].pids == row.pids[: events.MAX_USAGE_PIDS]
    assert kept.problems[0].endswith("...") and len(kept.problems[0]) == events.MAX_PROBLEM
    small = msgspec.structs.replace(usage, containers=(), escapes=(), problems=())
    assert usages.clipped(small) == (small, [])


@pytest.mark.parametrize(
    ("value", "uuids"),
    [
        ("dev-1, ", {"dev-1"}),  # HAMi's TestFit_DeviceCordon value
        ("dev-0,dev-1", {"dev-0", "dev-1"}),
        ("", set()),
        (" , ,", set()),
        (" GPU-a ,GPU-b,,GPU-a", {"GPU-a", "GPU-b"}),
    ],
)
def test_the_device_cordon_annotation_reads_as_hamis_comma_list(
    value: str, uuids: set[str]
) -> None:
    assert registrations.parse_cordon(value) == uuids


def test_a_cordoned_gpu_registers_cordoned_and_an_overlong_annotation_is_refused() -> None:
    reg = registrations.node_devices(
        "n1", [gpu(0), gpu(1)], scaling=Scaling(), cordoned=frozenset({"GPU-1", "GPU-9"})
    )
    assert [(d.uuid, d.cordoned, d.healthy) for d in reg.devices] == [
        ("GPU-0", False, True),
        ("GPU-1", True, True),
    ]
    with pytest.raises(ValueError, match=r"hami\.io/device-cordon: 65,537 characters"):
        registrations.parse_cordon("x" * (registrations.MAX_CORDON_CHARS + 1))


class FlakyNodes:
    """A Kubernetes API whose node reads answer in turn from ``answers``."""

    def __init__(self, *answers: object) -> None:
        self.answers = list(answers)

    async def node_annotations(self, node: str) -> dict[str, str]:
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        assert isinstance(answer, dict)
        return answer


class NoGpus:
    """A GPU backend the cordon never reaches: every call fails the test."""

    kind = "none"

    def discover(self) -> list[Gpu]:
        raise AssertionError("the cordon read the GPUs")

    def read(self) -> tuple[list[usages.DeviceReading], list[usages.ProcessReading]]:
        raise AssertionError("the cordon read the GPUs")

    def wait_xids(self, timeout_s: float) -> list[tuple[str, int]]:
        raise AssertionError("the cordon waited for XIDs")

    def close(self) -> None:
        raise AssertionError("the cordon closed the GPUs")


async def test_an_unreadable_node_keeps_the_cordon_and_is_logged_once(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    down = kube.KubeError("read node n1", 0, "connection refused")
    node_loops = loops.NodeLoops(
        node="n1",
        backend=NoGpus(),
        slicer=Slicer(node="n1", layout=preparing.Layout(root=str(tmp_path), libvgpu="-")),
        found=[gpu(0), gpu(1)],
        settings=nodeconfigs.NodeSettings(scaling=Scaling()),
        margin_mib=0,
        kill=False,
        usage_every_s=1.0,
        rediscover_s=1.0,
        reported=probes.Beat("usage", 60.0),
        kube_api=FlakyNodes(down, down, {registrations.DEVICE_CORDON: "GPU-1"}, {}),
    )
    caplog.set_level(logging.WARNING, logger="vslice.nodeagent")
    await node_loops.read_cordon()
    await node_loops.read_cordon()
    assert [r.getMessage() for r in caplog.records].count(
        "device cordon not read; the node keeps its cordon"
    ) == 1
    assert node_loops.cordoned == frozenset()
    await node_loops.read_cordon()
    assert [d.cordoned for d in node_loops.registration().devices] == [False, True]
    await node_loops.read_cordon()  # the annotation removed
    assert not any(d.cordoned for d in node_loops.registration().devices)
