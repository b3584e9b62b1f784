"""``python -m services.nodeagent --device-plugin --kube ...`` as a process: mock GPUs from
``VSLICE_MOCKGPU_DEVICES``, the API from ``$KUBECONFIG`` (kmock's emulator), kubelet the
fake one; without the bus (a device fault injected through the mock NVML reaches kubelet)
and with it (registration in the nodes bucket; Allocate checked against the ledger)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import kmock
import msgspec
import pytest

from libshared import annotations as keys
from libshared import connecting, events
from libshared.devices import NodeDevices
from libshared.ledgers import NodeLedger, Slice
from libshared.natsserver import NatsServer
from libshared.permissions import Role
from tests.k8s.nodeagent.conftest import G0, G1, MOCKGPU_DEVICES, NODE, SPLIT
from tests.k8s.nodeagent.fakekubelet import FakeKubelet
from tests.k8s.nodeagent.pods import bound_pod
from tests.k8s.nodeagent.test_deviceplugin import eventually
from tests.libvgpu import harness


def kubeconfig(path: Path, server: str) -> Path:
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters: [{{name: k, cluster: {{server: '{server}'}}}}]\n"
        "users: [{name: u, user: {}}]\n"
        "contexts: [{name: c, context: {cluster: k, user: u}}]\n"
        "current-context: c\n"
    )
    return path


@contextlib.asynccontextmanager
async def agent_process(
    tmp_path: Path, emulator: kmock.KubernetesEmulator, kubelet: FakeKubelet, *extra: str
) -> AsyncIterator[dict[str, str]]:
    """The node agent as a device plugin of ``NODE`` (plus ``extra`` flags); yields its
    environment. On the way out: SIGTERM, a clean exit, and its socket gone."""
    host = tmp_path / "host"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("VSLICE_", "KUBERNETES_")) and k != "NODE_NAME"
    }
    env.update(
        KUBECONFIG=str(kubeconfig(tmp_path / "kubeconfig", str(emulator.url))),
        VSLICE_MOCKGPU_DEVICES=MOCKGPU_DEVICES,
        NODE_NAME=NODE,
    )
    log_path = tmp_path / "agent.log"
    with log_path.open("wb") as log:
        agent = subprocess.Popen(
            [
                *(sys.executable, "-m", "services.nodeagent"),
                *("--device-plugin", "--kube", "--kubelet-dir", str(kubelet.directory)),
                *("--host-root", str(host), "--backend", "mock", "--split-count", str(SPLIT)),
                *("--usage-interval", "0.5", *extra),
            ],
            cwd=harness.ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            try:
                await kubelet.wait_registered(timeout_s=90)
            except TimeoutError:
                raise AssertionError(log_path.read_text()) from None
            yield env
        finally:
            agent.send_signal(signal.SIGTERM)
            try:
                code = await asyncio.to_thread(agent.wait, 30)
            finally:
                if agent.poll() is None:
                    agent.kill()
    assert code == 0, log_path.read_text()
    assert not (kubelet.directory / "vslice-nvidia.sock").exists()


@dataclass
class OnTheBus:
    """A nats-server for one test: ``opened`` (the test's own view of the buckets) and
    ``flags`` (the agent's bus flags and its identity's, for ``NODE``)."""

    opened: connecting.Bus
    flags: tuple[str, ...]


@contextlib.asynccontextmanager
async def on_the_bus(tmp_path: Path, prefix: str) -> AsyncIterator[OnTheBus]:
    with NatsServer(data_dir=tmp_path / "nats") as server:
        bus_settings = server.bus_settings(prefix=prefix)
        agent = server.identity(f"agent-{prefix}", Role.NODEAGENT, prefix=prefix, node=NODE)
        nc = await connecting.connect(bus_settings, name="test")
        try:
            opened = await connecting.ensure_bus(nc.jetstream(), bus_settings)
            flags = ("--nats-url", server.url, "--prefix", prefix, *agent.credential_arguments())
            yield OnTheBus(opened=opened, flags=flags)
        finally:
            await nc.close()


async def test_the_node_agent_serves_kubelet_on_mock_gpus_without_the_bus(
    native: None, tmp_path: Path, emulator: kmock.KubernetesEmulator
) -> None:
    kubelet = FakeKubelet(tmp_path / "dp")
    await kubelet.start()
    host = tmp_path / "host"
    try:
        async with agent_process(tmp_path, emulator, kubelet) as env:
            reg = kubelet.registrations[0]
            assert (reg.resource_name, reg.endpoint) == ("nvidia.com/gpu", "vslice-nvidia.sock")
            devices = await kubelet.wait_devices(lambda d: len(d) == 2 * SPLIT)
            assert set(devices.values()) == {"Healthy"}

            def annotated() -> bool:
                meta = emulator.objects["v1/nodes", None, NODE].raw["metadata"]
                return keys.NODE_NVIDIA_REGISTER in (meta.get("annotations") or {})

            await eventually(annotated, "node annotation", timeout_s=30)

            emulator.objects["v1/pods", "default", "p"] = bound_pod(
                "p", node=NODE, containers=[[(G1, 3000, 30)]]
            )
            got = await kubelet.admit(1)
            assert got.envs["CUDA_DEVICE_MEMORY_LIMIT_0"] == "3000m"
            assert got.envs["CUDA_DEVICE_SM_LIMIT"] == "30"
            assert got.envs["NVIDIA_VISIBLE_DEVICES"] == G1
            assert got.envs["LD_LIBRARY_PATH"] == "/usr/local/vslice/mockgpu"  # the mock driver
            lib = got.mount("/usr/local/vslice/libvgpu.so")
            assert lib is not None and Path(lib[0]).read_bytes() == harness.LIBVGPU.read_bytes()
            assert (host / "containers" / "uid-p_c0" / "vgpu.cache").is_file()
            meta = emulator.objects["v1/pods", "default", "p"].raw["metadata"]
            assert meta["annotations"][keys.BIND_PHASE] == "success"

            # a device fault (XID 79) on GPU 0, through the mock NVML the agent watches
            subprocess.run(
                [sys.executable, "-m", "tests.nodeagent.nvmlcheck", "inject", "0:79"],
                cwd=harness.ROOT,
                env={
                    **env,
                    "LD_LIBRARY_PATH": str(harness.MOCK_DIR),
                    "VSLICE_MOCKGPU_STATE": str(host / "mockgpu.state"),
                },
                check=True,
                capture_output=True,
                timeout=30,
            )
            devices = await kubelet.wait_devices(lambda d: d.get(f"{G0}-0") == "Unhealthy")
            assert {h for d, h in devices.items() if d.startswith(G1)} == {"Healthy"}
    finally:
        await kubelet.stop()


async def test_with_the_bus_the_agent_registers_there_and_allocates_only_what_the_ledger_holds(
    native: None, tmp_path: Path, emulator: kmock.KubernetesEmulator
) -> None:
    prefix = "dp" + uuid.uuid4().hex[:8]
    kubelet = FakeKubelet(tmp_path / "dp")
    await kubelet.start()
    async with on_the_bus(tmp_path, prefix) as bus:
        held = Slice(
            pod_uid="uid-honest",
            namespace="default",
            pod="honest",
            container="c0",
            container_index=0,
            uuid=G0,
            device_index=0,
            memory_mib=3000,
            cores_percent=30,
        )
        ledger = NodeLedger(node=NODE, slices=(held,))
        await bus.opened.ledger.put(NODE, events.ENCODER.encode(ledger))
        # the scheduler placed "honest"; "greedy" wrote itself a slice, and bound earlier
        emulator.objects["v1/pods", "default", "greedy"] = bound_pod(
            "greedy", node=NODE, containers=[[(G0, 16000, 100)]], bind_time=1
        )
        emulator.objects["v1/pods", "default", "honest"] = bound_pod(
            "honest", node=NODE, containers=[[(G0, 3000, 30)]], bind_time=2
        )
        async with agent_process(tmp_path, emulator, kubelet, *bus.flags):
            await kubelet.wait_devices(lambda d: len(d) == 2 * SPLIT)
            got = await kubelet.admit(1)
            assert got.envs["CUDA_DEVICE_MEMORY_LIMIT_0"] == "3000m"
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await kubelet.admit(1)
            assert "16000 MiB 100 % not in the ledger" in str(caught.value.details())
            entry = await bus.opened.nodes.get(NODE)
            registered = msgspec.json.decode(entry.value, type=NodeDevices)
            assert [d.uuid for d in registered.devices] == [G0, G1]
    await kubelet.stop()


async def test_a_node_config_shapes_what_kubelet_sees_and_a_change_applies_without_a_restart(
    native: None, tmp_path: Path, emulator: kmock.KubernetesEmulator
) -> None:
    # HAMi's device plugin config.json: this node's split count over --split-count, and
    # GPU 1 filtered out by index; then changed while the agent runs, then broken
    config = tmp_path / "config.json"
    config.write_text(
        '{"nodeconfig": [{"name": "other", "devicesplitcount": 9},'
        f' {{"name": "{NODE}", "devicesplitcount": 3, "filterdevices": {{"index": [1]}}}}]}}'
    )
    kubelet = FakeKubelet(tmp_path / "dp")
    await kubelet.start()
    flags = ("--node-config", str(config), "--node-config-poll", "0.1")
    try:
        async with agent_process(tmp_path, emulator, kubelet, *flags):
            devices = await kubelet.wait_devices(bool)
            assert sorted(devices) == [f"{G0}-{i}" for i in range(3)]

            def annotation() -> str:
                meta = emulator.objects["v1/nodes", None, NODE].raw["metadata"]
                return str((meta.get("annotations") or {}).get(keys.NODE_NVIDIA_REGISTER, ""))

            await eventually(lambda: G0 in annotation(), "node annotation", timeout_s=30)
            assert G1 not in annotation()

            config.write_text(
                f'{{"nodeconfig": [{{"name": "{NODE}", "devicememoryscaling": 2,'
                ' "devicesplitcount": 5}]}'
            )
            devices = await kubelet.wait_devices(lambda d: len(d) == 2 * 5)
            assert {d.rsplit("-", 1)[0] for d in devices} == {G0, G1}
            await eventually(lambda: "32768" in annotation(), "scaled memory", timeout_s=30)

            log_path = tmp_path / "agent.log"
            config.write_text(entry(NODE, '"devicesplitcount": 0'))
            await eventually(
                lambda: "node config not applied" in log_path.read_text(), "refusal logged"
            )
            assert "devicesplitcount" in log_path.read_text()
            assert len(kubelet.devices) == 2 * 5  # the last good settings stay
    finally:
        await kubelet.stop()


def entry(node: str, keys: str) -> str:
    """A config.json with one entry: ``node`` and the JSON members ``keys``."""
    return f'{{"nodeconfig": [{{"name": "{node}", {keys}}}]}}'


@pytest.mark.parametrize(
    ("text", "named"),
    [
        (entry("n-0", '"devicesplitcount": 0'), "devicesplitcount"),
        (entry("n-0", '"operatingmode": "vgpu"'), "operatingmode"),
        (entry("n-0", '"devicememoryscalling": 2'), "devicememoryscalling"),
        ("{", "not JSON"),
    ],
)
def test_a_bad_node_config_stops_the_agent_before_it_starts(
    tmp_path: Path, text: str, named: str
) -> None:
    config = tmp_path / "config.json"
    config.write_text(text)
    done = subprocess.run(
        [
            *(sys.executable, "-m", "services.nodeagent", "--host-root", str(tmp_path / "h")),
            *("--backend", "mock", "--node-prefix", "n", "--node-config", str(config)),
        ],
        cwd=harness.ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert named in done.stderr and str(config) in done.stderr
    assert "Traceback" not in done.stderr


async def test_a_gpu_in_the_nodes_device_cordon_annotation_registers_cordoned_until_removed(
    native: None, tmp_path: Path, emulator: kmock.KubernetesEmulator
) -> None:
    # HAMi's hami.io/device-cordon: a comma-separated UUID list, trimmed, empties skipped
    prefix = "dc" + uuid.uuid4().hex[:8]
    kubelet = FakeKubelet(tmp_path / "dp")
    await kubelet.start()
    async with on_the_bus(tmp_path, prefix) as bus:
        node_meta = emulator.objects["v1/nodes", None, NODE].raw["metadata"]
        node_meta["annotations"]["hami.io/device-cordon"] = f" {G1}, ,GPU-elsewhere"

        async def cordoned() -> set[str]:
            try:
                entry = await bus.opened.nodes.get(NODE)
            except Exception:  # not registered yet
                return {"-"}
            registered = msgspec.json.decode(entry.value, type=NodeDevices)
            return {d.uuid for d in registered.devices if d.cordoned}

        async def until(want: set[str]) -> None:
            deadline = asyncio.get_running_loop().time() + 30
            while (got := await cordoned()) != want:
                assert asyncio.get_running_loop().time() < deadline, got
                await asyncio.sleep(0.05)

        async with agent_process(tmp_path, emulator, kubelet, *bus.flags, "--cordon-poll", "0.1"):
            await until({G1})
            devices = await kubelet.wait_devices(lambda d: len(d) == 2 * SPLIT)
            assert set(devices.values()) == {"Healthy"}  # kubelet keeps every replica
            fresh = emulator.objects["v1/nodes", None, NODE].raw["metadata"]
            fresh["annotations"].pop("hami.io/device-cordon")
            await until(set())
    await kubelet.stop()
