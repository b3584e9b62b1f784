"""End to end on a mixed cluster (``clusters.cluster``): node n1 has one GPU sliced by
libvgpu, node n2 one A100-SXM4-40GB in MIG mode, its node agent given HAMi's
device-plugin config putting n2 in ``operatingmode: mig`` (dynamic MIG), node n3 two
Hygon DCUs (Z100) and no GPU.

A pod written for HAMi's sliced mode binds to n1 and ``Allocate`` gives it its limits;
a pod choosing MIG with HAMi's mode selector (``nvidia.com/vgpu-mode: mig``) and asking
9,000 MiB binds to n2 with the GPU instance the scheduler picked for it in
``hami.io/vgpu-mig-allocations`` (``1g.10gb``, the smallest A100-40GB profile holding
9,000 MiB), and ``Allocate`` on n2 creates that instance through the (mock) NVML and names
its MIG device, with no libvgpu limit and no preload; a MIG pod asking 50,000 MiB fits
neither node and is refused with HAMi's reasons. A pod asking ``hygon.com/dcunum`` is
admitted, fitted to n3's DCUs only, bound with ``hami.io/dcu-devices-allocated``, and
``Allocate`` of n3's DCU plugin answers ``HIP_VISIBLE_DEVICES``.
"""

from __future__ import annotations

import ast
import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from libshared import annotations as keys
from libshared import migs
from libshared.natsserver import NatsServer
from tests.k8s.e2e import clusters
from tests.k8s.e2e.clusters import until
from tests.libvgpu import harness

SLICED_GPU = "GPU-0e2e0001-0000-4000-8000-000000000001"
MIG_GPU = "GPU-0e2e0002-0000-4000-8000-0000000000a1"
DCU0 = "DCU-0e2e0003-0000-4000-8000-0000000000d0"
DCU1 = "DCU-0e2e0003-0000-4000-8000-0000000000d1"
A100 = "NVIDIA A100-SXM4-40GB"
MIB_SLICED = 24576
SPLIT = 4
MOCK_NVML = harness.ROOT / "services" / "nodeagent" / "mockgpu" / "libnvidia-ml.so.1"
LIST_INSTANCES = """
import ctypes, json, sys
import pynvml
pynvml.nvmlLib = ctypes.CDLL(sys.argv[1])
pynvml._nvmlGetFunctionPointer_cache.clear()
pynvml.nvmlInit()
from services.nodeagent.adapters.migdevices import NvmlMig
print(json.dumps([r.__dict__ for r in NvmlMig().instances(sys.argv[2])]))
"""


def pod(
    name: str, *, memory_mib: int, cores: int | None = None, mode: str | None = None
) -> dict[str, Any]:
    """A pod asking one GPU of ``memory_mib`` (and ``cores`` percent), written for HAMi;
    ``mode``: its ``nvidia.com/vgpu-mode`` annotation."""
    limits = {"nvidia.com/gpu": 1, "nvidia.com/gpumem": memory_mib}
    if cores is not None:
        limits["nvidia.com/gpucores"] = cores
    meta: dict[str, Any] = {"name": name, "namespace": "default"}
    if mode is not None:
        meta["annotations"] = {keys.VGPU_MODE: mode}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {
            "containers": [
                {
                    "name": "train",
                    "image": "pytorch/pytorch:2.3.0-cuda12.1-cudnn8-runtime",
                    "resources": {"limits": limits},
                }
            ]
        },
    }


def dcu_pod(name: str, *, memory_mib: int, cores: int) -> dict[str, Any]:
    """A pod asking one Hygon DCU of ``memory_mib`` and ``cores`` percent, as HAMi's
    examples/hygon write it."""
    limits = {"hygon.com/dcunum": 1, "hygon.com/dcumem": memory_mib, "hygon.com/dcucores": cores}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "containers": [
                {
                    "name": "infer",
                    "image": "image.sourcefind.cn:5000/dcu/admin/base/pytorch",
                    "resources": {"limits": limits},
                }
            ]
        },
    }


def instances(state: Path, gpu: str) -> list[dict[str, Any]]:
    """The GPU instances the mock card ``gpu`` whose state file is ``state`` holds, as
    another process sees them through the mock NVML."""
    done = subprocess.run(
        [sys.executable, "-c", LIST_INSTANCES, str(MOCK_NVML), gpu],
        cwd=harness.ROOT,
        env=clusters.clean_env(VSLICE_MOCKGPU_STATE=str(state)),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    listed: list[dict[str, Any]] = json.loads(done.stdout)
    return listed


async def test_a_sliced_pod_binds_to_the_sliced_gpu_and_a_mig_pod_gets_an_instance_on_the_mig_gpu(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    geometry = migs.geometry_for(A100)
    assert geometry is not None
    profile = geometry.profile("1g.10gb")
    assert profile is not None
    nodes = [
        clusters.NodeSpec(name="n1", devices=f"{SLICED_GPU}:{MIB_SLICED}", replicas=SPLIT),
        clusters.NodeSpec(
            name="n2",
            devices=f"{MIG_GPU}:40960:{A100}:mig",
            # a MIG-mode GPU: one replica per instance it holds at once (7 1g on an A100)
            replicas=max(len(p.starts) for p in geometry.profiles),
            node_config=clusters.mig_node_config("n2"),
        ),
        clusters.NodeSpec(
            name="n3", devices="", dcus=f"{DCU0}:32768:Z100,{DCU1}:32768:Z100", replicas=2 * SPLIT
        ),
    ]
    async with clusters.cluster(tmp_path, nats_server, nodes=nodes, split_count=SPLIT) as c:
        state = c.host_root("n2") / "mockgpu.state"
        assert instances(state, MIG_GPU) == []

        await asyncio.gather(
            # HAMi's mode selector is opt-in: a pod without it may be given a MIG
            # instance (it was, on n2, when tried), so the sliced pod names its mode
            c.create(pod("sliced", memory_mib=3000, cores=30, mode="hami-core")),
            c.create(pod("mig", memory_mib=9000, mode="mig")),
        )
        await until(
            lambda: c.bound("sliced") and c.bound("mig"),
            lambda: f"binds of the sliced and the MIG pod (errors: {c.scheduler.errors})",
            c.logs,
            timeout_s=30,
        )
        assert (c.bound("sliced"), c.bound("mig")) == ("n1", "n2")

        # the sliced pod: libvgpu's limits on n1's GPU
        sliced = c.api.pod("default", "sliced")
        assert sliced is not None
        annos = sliced["metadata"]["annotations"]
        assert annos[keys.VGPU_DEVICES_ALLOCATED] == f"{SLICED_GPU},NVIDIA,3000,30:;"
        assert keys.VGPU_MIG_ALLOCATIONS not in annos
        got = await c.kubelets["n1"].admit(1)
        assert got.envs["CUDA_DEVICE_MEMORY_LIMIT_0"] == "3000m"
        assert got.envs["CUDA_DEVICE_SM_LIMIT"] == "30"
        assert got.envs["NVIDIA_VISIBLE_DEVICES"] == SLICED_GPU
        assert got.mount("/etc/ld.so.preload") is not None

        # the MIG pod: the GPU instance the scheduler chose on n2's A100
        mig = c.api.pod("default", "mig")
        assert mig is not None
        annos = mig["metadata"]["annotations"]
        assert annos[keys.VGPU_NODE] == "n2"
        # the grant is the whole instance: its memory, and no cores share to enforce
        assert annos[keys.VGPU_DEVICES_ALLOCATED] == f"{MIG_GPU},NVIDIA,{profile.memory_mib},0:;"
        (chosen,) = keys.decode_mig_allocations(annos[keys.VGPU_MIG_ALLOCATIONS])
        assert (chosen.container_index, chosen.device_index) == (0, 0)
        assert (chosen.gpu_uuid, chosen.profile) == (MIG_GPU, "1g.10gb")
        assert chosen.placement.size == profile.size
        assert chosen.placement.start in profile.starts
        got = await c.kubelets["n2"].admit(1)
        visible = got.envs["NVIDIA_VISIBLE_DEVICES"]
        assert visible.startswith("MIG-"), got.envs
        assert not [k for k in got.envs if k.startswith("CUDA_DEVICE_MEMORY_LIMIT")], got.envs
        assert got.mount("/etc/ld.so.preload") is None
        # the instance exists on the card, where the placement put it
        (made,) = instances(state, MIG_GPU)
        assert (made["profile"], made["start"], made["size"]) == (
            "1g.10gb",
            chosen.placement.start,
            chosen.placement.size,
        )
        assert made["mig_uuid"] == visible
        print(
            f"[e2e] MIG pod: bound to n2 ({annos[keys.VGPU_DEVICES_ALLOCATED]}), instance "
            f"{made['profile']}@{made['start']} made by Allocate: {visible}"
        )
        await until(
            lambda: all(
                (c.api.pod("default", name) or {})["metadata"]["annotations"].get(keys.BIND_PHASE)
                == "success"
                for name in ("sliced", "mig")
            ),
            "bind-phase success of both pods",
            c.logs,
            timeout_s=30,
        )
        # the reservation completed as HAMi's device plugin completes it: the MIG UUID and
        # the instance IDs added to hami.io/vgpu-mig-allocations
        stored = (c.api.pod("default", "mig") or {})["metadata"]["annotations"]
        (realized,) = keys.decode_mig_allocations(stored[keys.VGPU_MIG_ALLOCATIONS])
        assert realized.mig_uuid == visible
        assert realized.gpu_instance_id == made["gpu_instance_id"]
        assert realized.compute_instance_id == made["compute_instance_id"]
        assert (realized.profile, realized.placement) == (chosen.profile, chosen.placement)

        # a MIG pod no A100-40GB instance holds: refused on every node, each for its reason
        await c.create(pod("mig-too-big", memory_mib=50000, mode="mig"))

        def refusals() -> set[str]:
            events = c.events_of("mig-too-big")
            return {e["message"] for e in events if e["reason"] == "FilteringFailed"}

        await until(
            lambda: len(refusals()) >= 3 and "mig-too-big" in c.scheduler.errors,
            lambda: f"FilteringFailed Events of the MIG pod fitting nowhere ({refusals()})",
            c.logs,
            timeout_s=30,
        )
        assert refusals() == {
            "1 nodes CardTypeMismatch(n1)",  # a sliced GPU, not the mode it asks
            "1 nodes CardInsufficientMemory(n2)",  # no profile holds 50,000 MiB
            "no available node, 3 nodes do not meet",
        }
        assert ast.literal_eval(c.scheduler.errors["mig-too-big"]) == {
            "n1": "1/1 CardTypeMismatch",
            "n2": "1/1 CardInsufficientMemory",
            "n3": "NodeInsufficientDevice",  # DCUs only: no NVIDIA device to fit to
        }
        assert not c.bound("mig-too-big")
        assert instances(state, MIG_GPU) == [made]  # nothing made for the refused pod

        # a DCU pod: admitted, fitted to n3's DCUs alone, bound, allocated by index
        await c.create(dcu_pod("dcu", memory_mib=8192, cores=50))
        await until(
            lambda: c.bound("dcu"),
            lambda: f"bind of the DCU pod (errors: {c.scheduler.errors})",
            c.logs,
            timeout_s=30,
        )
        assert c.bound("dcu") == "n3"
        annos = (c.api.pod("default", "dcu") or {})["metadata"]["annotations"]
        (grant,) = keys.decode_pod_devices(
            annos[keys.DCU_DEVICES_ALLOCATED], key=keys.DCU_DEVICES_ALLOCATED
        )[0]
        assert (grant.vendor, grant.memory_mib, grant.cores_percent) == ("DCU", 8192, 50)
        assert grant.uuid in (DCU0, DCU1)
        assert keys.VGPU_DEVICES_ALLOCATED not in annos
        got = await c.kubelets["n3"].admit(1)
        assert got.envs["HIP_VISIBLE_DEVICES"] == ("0" if grant.uuid == DCU0 else "1")
        assert "NVIDIA_VISIBLE_DEVICES" not in got.envs
        assert got.mount("/etc/ld.so.preload") is None
        await until(
            lambda: (
                (c.api.pod("default", "dcu") or {})["metadata"]["annotations"].get(keys.BIND_PHASE)
                == "success"
            ),
            "bind-phase success of the DCU pod",
            c.logs,
            timeout_s=30,
        )
        node = c.api.objects["v1/nodes", None, "n3"].raw["metadata"]["annotations"]
        registered = keys.decode_node_devices(
            node[keys.NODE_DCU_REGISTER], key=keys.NODE_DCU_REGISTER, vendor="DCU"
        )
        assert [(d.uuid, d.index, d.type) for d in registered] == [
            (DCU0, 0, "DCU-Z100"),
            (DCU1, 1, "DCU-Z100"),
        ]
        assert node[keys.NODE_HANDSHAKE_DCU].startswith("Reported ")
