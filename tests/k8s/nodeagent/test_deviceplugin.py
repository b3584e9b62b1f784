"""The device plugin between a fake kubelet (gRPC on unix sockets) and kmock's Kubernetes
API emulator (HTTP): registration, ListAndWatch, preferred replicas, Allocate and the
annotations it leaves, kubelet restarts."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import kmock
import pytest

from libshared import annotations as keys
from libshared.ledgers import NodeLedger, Slice
from services.nodeagent.core import devicelists, sharedcaches
from tests.k8s.nodeagent import plugins
from tests.k8s.nodeagent.conftest import (
    G0,
    G1,
    MOCKGPU_DEVICES,
    NODE,
    SPLIT,
    Stack,
    registration,
)
from tests.k8s.nodeagent.fakekubelet import FakeKubelet
from tests.k8s.nodeagent.pods import bound_pod

MIB = 1 << 20


async def eventually(check: object, what: str, timeout_s: float = 20.0) -> None:
    """Wait until ``check()`` is true (polling), failing with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(0.05)


def replicas_of(uuid: str) -> list[str]:
    return [f"{uuid}-{i}" for i in range(SPLIT)]


async def test_the_plugin_registers_nvidia_gpu_on_its_socket_with_version_v1beta1(
    stack: Stack,
) -> None:
    reg = stack.kubelet.registrations[0]
    assert (reg.version, reg.resource_name, reg.endpoint) == (
        "v1beta1",
        "nvidia.com/gpu",
        "vslice-nvidia.sock",
    )
    assert reg.options.get_preferred_allocation_available
    assert not reg.options.pre_start_required
    assert (
        stack.kubelet.options is not None
        and stack.kubelet.options.get_preferred_allocation_available
    )
    assert (stack.kubelet.directory / reg.endpoint).is_socket()


async def test_list_and_watch_sends_split_count_replicas_and_again_on_a_health_change(
    stack: Stack,
) -> None:
    devices = await stack.kubelet.list_and_watch()
    assert devices == {d: "Healthy" for d in replicas_of(G0) + replicas_of(G1)}
    before = stack.kubelet.updates
    await stack.plugin.update(registration(unhealthy=frozenset({G1})))
    devices = await stack.kubelet.wait_devices(lambda d: d.get(f"{G1}-0") == "Unhealthy")
    assert devices == {
        **{d: "Healthy" for d in replicas_of(G0)},
        **{d: "Unhealthy" for d in replicas_of(G1)},
    }
    assert stack.kubelet.updates == before + 1
    await stack.plugin.update(registration(unhealthy=frozenset({G1})))  # no change: no message
    await stack.plugin.update(registration())
    await stack.kubelet.wait_devices(lambda d: d.get(f"{G1}-0") == "Healthy")
    assert stack.kubelet.updates == before + 2


async def test_the_node_annotation_is_written_at_start_and_on_change_and_decodes(
    stack: Stack,
) -> None:
    await eventually(
        lambda: keys.NODE_NVIDIA_REGISTER in stack.node_annotations(), "node annotation"
    )
    decoded = keys.decode_node_devices(stack.node_annotations()[keys.NODE_NVIDIA_REGISTER])
    assert decoded == registration().devices
    assert [(d.uuid, d.split_count, d.memory_mib) for d in decoded] == [
        (G0, SPLIT, 16384),
        (G1, SPLIT, 16384),
    ]
    await stack.plugin.update(registration(unhealthy=frozenset({G0})))

    def g0_unhealthy() -> bool:
        value = stack.node_annotations()[keys.NODE_NVIDIA_REGISTER]
        return not keys.decode_node_devices(value)[0].healthy

    await eventually(g0_unhealthy, "unhealthy GPU in the node annotation")


async def test_preferred_allocation_points_kubelet_at_the_pending_pods_gpu(stack: Stack) -> None:
    stack.add_pod(bound_pod("p", node=NODE, containers=[[(G1, 3000, 30)]]))
    got = await stack.kubelet.preferred(1)
    assert got == [f"{G1}-0"]
    # nothing pending for two GPUs: two different GPUs
    got = await stack.kubelet.preferred(2)
    assert {d.rsplit("-", 1)[0] for d in got} == {G0, G1}


async def test_allocate_gives_a_3000_mib_30_percent_pod_its_slice_and_marks_it_success(
    stack: Stack,
) -> None:
    stack.add_pod(bound_pod("p", node=NODE, containers=[[(G0, 3000, 30)]]))
    got = await stack.kubelet.admit(1)
    assert got.device_ids[0].startswith(G0)
    assert got.envs["CUDA_DEVICE_MEMORY_LIMIT_0"] == "3000m"
    assert got.envs["CUDA_DEVICE_SM_LIMIT"] == "30"
    assert got.envs["CUDA_VISIBLE_DEVICES"] == got.envs["NVIDIA_VISIBLE_DEVICES"] == G0
    cache_in_container = got.envs["CUDA_DEVICE_MEMORY_SHARED_CACHE"]
    assert cache_in_container == "/usr/local/vslice/cache/vgpu.cache"
    lib = got.mount("/usr/local/vslice/libvgpu.so")
    assert lib is not None and lib[1] and Path(lib[0]).is_file()
    assert Path(lib[0]).name.startswith("libvgpu-")  # the versioned copy, not the link
    preload = got.mount("/etc/ld.so.preload")
    assert preload is not None and preload[1]
    assert Path(preload[0]).read_text() == "/usr/local/vslice/libvgpu.so\n"
    cache_dir = got.mount("/usr/local/vslice/cache")
    assert cache_dir is not None and not cache_dir[1]
    assert cache_dir[0] == str(stack.root / "containers" / "uid-p_c0")
    cache = sharedcaches.decode((Path(cache_dir[0]) / "vgpu.cache").read_bytes())
    assert cache.devices[0].limit_bytes == 3000 * MIB
    assert cache.devices[0].sm_limit_percent == 30
    annotations = stack.annotations("p")
    assert annotations[keys.BIND_PHASE] == "success"
    assert keys.VGPU_DEVICES_TO_ALLOCATE not in annotations
    assert annotations[keys.VGPU_DEVICES_ALLOCATED] == f"{G0},NVIDIA,3000,30:;"


async def test_the_second_bound_pod_allocated_first_gets_its_own_slice(stack: Stack) -> None:
    # HAMi #3076's shape: two pods bound to the node, kubelet admits the later one first
    stack.add_pod(bound_pod("first", node=NODE, containers=[[(G0, 3000, 30)]], bind_time=100))
    stack.add_pod(bound_pod("second", node=NODE, containers=[[(G1, 5000, 50)]], bind_time=200))
    [second] = await stack.kubelet.allocate([f"{G1}-3"])
    assert second.envs["CUDA_DEVICE_MEMORY_LIMIT_0"] == "5000m"
    assert second.envs["NVIDIA_VISIBLE_DEVICES"] == G1
    assert stack.annotations("second")[keys.BIND_PHASE] == "success"
    assert stack.annotations("first")[keys.BIND_PHASE] == "allocating"
    [first] = await stack.kubelet.allocate([f"{G0}-1"])
    assert first.envs["CUDA_DEVICE_MEMORY_LIMIT_0"] == "3000m"
    assert stack.annotations("first")[keys.BIND_PHASE] == "success"


async def test_concurrent_allocates_each_find_their_own_pod_and_no_slice_twice(
    stack: Stack,
) -> None:
    # eight pods bound to the node at once, four per GPU, every one of its own size
    sizes = {f"p{i}": (G0 if i % 2 else G1, 1000 + 100 * i) for i in range(8)}
    for name, (uuid, mib) in sizes.items():
        stack.add_pod(bound_pod(name, node=NODE, containers=[[(uuid, mib, 10)]], bind_time=50))
    # kubelet admits them in bind order (the same second here: creation, then name)
    order = sorted(sizes)
    calls = [stack.kubelet.allocate([f"{sizes[n][0]}-{i // 2}"]) for i, n in enumerate(order)]
    results = await asyncio.gather(*calls)
    given = sorted(
        (a.envs["NVIDIA_VISIBLE_DEVICES"], a.envs["CUDA_DEVICE_MEMORY_LIMIT_0"]) for [a] in results
    )
    assert given == sorted((u, f"{m}m") for u, m in sizes.values())
    for name in sizes:
        assert stack.annotations(name)[keys.BIND_PHASE] == "success", name
    dirs = sorted(p.name for p in (stack.root / "containers").iterdir())
    assert dirs == sorted(f"uid-{n}_c0" for n in sizes)


async def test_each_container_of_a_pod_is_allocated_in_turn_and_the_last_marks_success(
    stack: Stack,
) -> None:
    pod = bound_pod(
        "multi", node=NODE, containers=[[(G0, 1000, 10)], [], [(G0, 2000, 20), (G1, 2000, 20)]]
    )
    stack.add_pod(pod)
    one = await stack.kubelet.admit(1)
    assert one.envs["CUDA_DEVICE_MEMORY_LIMIT_0"] == "1000m"
    annotations = stack.annotations("multi")
    assert annotations[keys.BIND_PHASE] == "allocating"
    # decoded as HAMi does, with the empty entry after the final ';'
    remaining = keys.decode_pod_devices(annotations[keys.VGPU_DEVICES_TO_ALLOCATE])
    assert [len(c) for c in remaining] == [0, 0, 2, 0]
    two = await stack.kubelet.admit(2)
    assert two.envs["NVIDIA_VISIBLE_DEVICES"] == f"{G0},{G1}"
    assert (two.envs["CUDA_DEVICE_MEMORY_LIMIT_0"], two.envs["CUDA_DEVICE_MEMORY_LIMIT_1"]) == (
        "2000m",
        "2000m",
    )
    assert {d.rsplit("-", 1)[0] for d in two.device_ids} == {G0, G1}
    assert two.mount("/usr/local/vslice/cache") == (
        str(stack.root / "containers" / "uid-multi_c2"),
        False,
    )
    assert stack.annotations("multi")[keys.BIND_PHASE] == "success"


async def test_cuda_disable_control_true_leaves_out_ld_so_preload(stack: Stack) -> None:
    stack.add_pod(
        bound_pod(
            "free", node=NODE, containers=[[(G0, 3000, 30)]], env={"CUDA_DISABLE_CONTROL": "true"}
        )
    )
    got = await stack.kubelet.admit(1)
    assert got.mount("/etc/ld.so.preload") is None
    assert got.mount("/usr/local/vslice/libvgpu.so") is not None
    assert got.envs["CUDA_DEVICE_MEMORY_LIMIT_0"] == "3000m"


async def test_no_pending_pod_is_a_clear_not_found_error(stack: Stack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.kubelet.allocate([f"{G0}-0"])
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no pod waiting on this node for 1 nvidia.com/gpu" in str(caught.value.details())
    # a pod waiting for two GPUs is no candidate for one, and the error says what waits
    stack.add_pod(bound_pod("two", node=NODE, containers=[[(G0, 1000, 10), (G1, 1000, 10)]]))
    broken = bound_pod("broken", node=NODE, containers=[[(G0, 1000, 10)]])
    broken["metadata"]["annotations"][keys.VGPU_DEVICES_TO_ALLOCATE] = "garbage"
    stack.add_pod(broken)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.kubelet.allocate([f"{G0}-0"])
    details = str(caught.value.details())
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "ask for [2]" in details and "garbage" in details
    assert stack.annotations("two")[keys.BIND_PHASE] == "allocating"


async def test_a_slice_on_a_gpu_the_node_lacks_fails_the_pod(stack: Stack) -> None:
    stack.add_pod(bound_pod("lost", node=NODE, containers=[[("GPU-elsewhere", 3000, 30)]]))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.kubelet.allocate([f"{G0}-0"])
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "GPU-elsewhere is not on this node" in str(caught.value.details())
    assert stack.annotations("lost")[keys.BIND_PHASE] == "failed"


async def test_kubelet_restart_makes_the_plugin_serve_and_register_again(stack: Stack) -> None:
    sock = stack.kubelet.directory / "vslice-nvidia.sock"
    first = sock.stat()
    await stack.kubelet.restart()  # removes the plugin's socket too, as kubelet does
    reg = await stack.kubelet.wait_registered(2)
    assert reg.resource_name == "nvidia.com/gpu"
    now = sock.stat()  # a new file (the inode number alone may be reused)
    assert (now.st_ino, now.st_ctime_ns) != (first.st_ino, first.st_ctime_ns)
    devices = await stack.kubelet.wait_devices(lambda d: len(d) == 2 * SPLIT)
    assert set(devices.values()) == {"Healthy"}
    stack.add_pod(bound_pod("after", node=NODE, containers=[[(G1, 2500, 25)]]))
    got = await stack.kubelet.admit(1)
    assert got.envs["CUDA_DEVICE_MEMORY_LIMIT_0"] == "2500m"


async def test_a_deleted_plugin_socket_is_served_again_and_registered(stack: Stack) -> None:
    (stack.kubelet.directory / "vslice-nvidia.sock").unlink()
    await stack.kubelet.wait_registered(2)
    assert (stack.kubelet.directory / "vslice-nvidia.sock").is_socket()
    assert await stack.kubelet.list_and_watch()


async def test_slices_of_pods_that_left_the_node_are_released(stack: Stack) -> None:
    stack.add_pod(bound_pod("gone", node=NODE, containers=[[(G0, 3000, 30)]]))
    stack.add_pod(bound_pod("stays", node=NODE, containers=[[(G1, 3000, 30)]]))
    await stack.kubelet.admit(1)
    await stack.kubelet.admit(1)
    del stack.api.objects["v1/pods", "default", "gone"]
    await eventually(lambda: "uid-gone_c0" in stack.plugin.slicer.released, "release")
    assert "uid-stays_c0" not in stack.plugin.slicer.released


def _held(uid: str, uuid: str, mib: int, cores: int) -> Slice:
    return Slice(
        pod_uid=uid,
        namespace="default",
        pod=uid.removeprefix("uid-"),
        container="c0",
        container_index=0,
        uuid=uuid,
        device_index=0,
        memory_mib=mib,
        cores_percent=cores,
    )


async def test_with_the_ledger_a_pod_whose_annotation_it_does_not_hold_is_refused(
    tmp_path: Path, emulator: kmock.KubernetesEmulator
) -> None:
    ledger = NodeLedger(node=NODE, slices=(_held("uid-honest", G0, 3000, 30),))

    async def read_ledger() -> NodeLedger:
        return ledger

    kubelet = FakeKubelet(tmp_path / "dp")
    await kubelet.start()
    async with plugins.running_plugin(
        tmp_path,
        node=NODE,
        api_url=str(emulator.url),
        kubelet_dir=kubelet.directory,
        devices=MOCKGPU_DEVICES,
        split_count=SPLIT,
        ledger=read_ledger,
    ):
        await kubelet.wait_registered()
        await kubelet.list_and_watch()
        # a pod that wrote itself a bigger slice than the scheduler gave anyone
        emulator.objects["v1/pods", "default", "greedy"] = bound_pod(
            "greedy", node=NODE, containers=[[(G0, 16000, 100)]], bind_time=1
        )
        emulator.objects["v1/pods", "default", "honest"] = bound_pod(
            "honest", node=NODE, containers=[[(G0, 3000, 30)]], bind_time=2
        )
        [got] = await kubelet.allocate([f"{G0}-0"])
        assert got.envs["CUDA_DEVICE_MEMORY_LIMIT_0"] == "3000m"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await kubelet.allocate([f"{G0}-1"])
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert "16000 MiB 100 % not in the ledger" in str(caught.value.details())
    await kubelet.stop()


async def test_a_plugin_started_before_kubelet_registers_once_kubelet_is_up(
    tmp_path: Path, emulator: kmock.KubernetesEmulator
) -> None:
    kubelet = FakeKubelet(tmp_path / "dp")
    async with plugins.running_plugin(
        tmp_path,
        node=NODE,
        api_url=str(emulator.url),
        kubelet_dir=kubelet.directory,
        devices=MOCKGPU_DEVICES,
        split_count=SPLIT,
    ) as plugin:
        await asyncio.sleep(0.3)  # several socket checks without a kubelet
        assert plugin.registrations == 0
        await kubelet.start()
        try:
            await kubelet.wait_registered()
            assert len(await kubelet.list_and_watch()) == 2 * SPLIT
            # kubelet has the request (and dials back) before the plugin has the answer
            await eventually(lambda: plugin.registrations >= 1, "the plugin counts its Register")
            assert plugin.registrations == 1
        finally:
            await kubelet.stop()


@pytest.mark.parametrize(
    ("strategies", "visible", "volume_mounted", "cdi"),
    [
        (("envvar",), G1, False, False),
        (("volume-mounts",), "/var/run/nvidia-container-devices", True, False),
        (("cdi-annotations",), None, False, True),
        (("cdi-annotations", "envvar"), G1, False, True),
    ],
)
async def test_allocate_names_the_gpu_to_the_runtime_by_the_nodes_device_list_strategy(
    tmp_path: Path,
    emulator: kmock.KubernetesEmulator,
    strategies: tuple[str, ...],
    visible: str | None,
    volume_mounted: bool,
    cdi: bool,
) -> None:
    kubelet = FakeKubelet(tmp_path / "dp")
    await kubelet.start()
    try:
        async with plugins.running_plugin(
            tmp_path,
            node=NODE,
            api_url=str(emulator.url),
            kubelet_dir=kubelet.directory,
            devices=MOCKGPU_DEVICES,
            split_count=SPLIT,
            device_list=devicelists.DeviceListSettings(
                strategies=strategies, pass_device_specs=True
            ),
        ):
            await kubelet.wait_registered()
            await kubelet.list_and_watch()
            pod = bound_pod("p", node=NODE, containers=[[(G1, 3000, 30)]])
            emulator.objects["v1/pods", "default", "p"] = pod
            got = await kubelet.admit(1)
            annotations = emulator.objects["v1/pods", "default", "p"].raw["metadata"]["annotations"]
    finally:
        await kubelet.stop()
    assert annotations[keys.BIND_PHASE] == "success"
    assert got.envs.get("NVIDIA_VISIBLE_DEVICES") == visible
    assert got.envs["CUDA_DEVICE_MEMORY_LIMIT_0"] == "3000m"  # the slice, whatever the list
    assert (got.mount(f"/var/run/nvidia-container-devices/{G1}") == ("/dev/null", False)) == (
        volume_mounted
    )
    assert got.mount("/etc/ld.so.preload") is not None
    if cdi:
        [(key, value)] = got.annotations.items()
        assert key.startswith("cdi.k8s.io/nvidia-device-plugin_")
        assert value == f"nvidia.com/gpu={G1}"
    else:
        assert got.annotations == {}
    # device specs were asked for: the GPU's node (mock minor = index 1), never with CDI alone
    nodes = {c for c, _, _ in got.devices}
    assert ("/dev/nvidia1" in nodes) == (strategies != ("cdi-annotations",))
    assert "/dev/nvidia0" not in nodes


async def test_two_allocates_under_cdi_get_distinct_annotation_keys(
    tmp_path: Path, emulator: kmock.KubernetesEmulator
) -> None:
    kubelet = FakeKubelet(tmp_path / "dp")
    await kubelet.start()
    try:
        async with plugins.running_plugin(
            tmp_path,
            node=NODE,
            api_url=str(emulator.url),
            kubelet_dir=kubelet.directory,
            devices=MOCKGPU_DEVICES,
            split_count=SPLIT,
            device_list=devicelists.DeviceListSettings(strategies=("cdi-annotations",)),
        ):
            await kubelet.wait_registered()
            await kubelet.list_and_watch()
            keys_seen = []
            for name in ("p", "q"):
                pod = bound_pod(name, node=NODE, containers=[[(G0, 1000, 10)]])
                emulator.objects["v1/pods", "default", name] = pod
                got = await kubelet.admit(1)
                keys_seen.extend(got.annotations)
    finally:
        await kubelet.stop()
    assert len(set(keys_seen)) == 2
