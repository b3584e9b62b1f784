"""MIG on the mock GPU: the NVML calls the node agent makes MIG devices with, their
shared state across processes, and CUDA opening a MIG device by its UUID.

The mock reads ``VSLICE_MOCKGPU_DEVICES`` and attaches to its state file once per
process, so every scenario runs in a fresh Python process (``pynvml`` pointed at the mock
``libnvidia-ml.so.1`` as ``NvmlGpus`` does, CUDA through ctypes on the mock
``libcuda.so.1``) on a state file of its own, and prints JSON the test checks. The
expected profiles come from ``libshared/migs.py``, the table the scheduler places by.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from libshared import migs
from tests.libvgpu import harness

NVML = harness.MOCK_DIR / "libnvidia-ml.so.1"
CUDA = harness.MOCK_DIR / "libcuda.so.1"
GPU = "GPU-a1000000-0000-4000-8000-000000000001"
A100 = "NVIDIA A100-SXM4-40GB"
A100_MIG = f"{GPU}:40960:{A100}:mig"
MIB = 1 << 20

# NVML return codes (nvml.h)
SUCCESS = 0
INVALID_ARGUMENT = 2
NOT_SUPPORTED = 3
NOT_FOUND = 6
IN_USE = 19
INSUFFICIENT_RESOURCES = 23
ARGUMENT_VERSION_MISMATCH = 25
CUDA_ERROR_OUT_OF_MEMORY = 2
CUDA_ERROR_NO_DEVICE = 100

# NVML GPU instance profile ids by (compute slices, memory slices), as the contract with
# the node agent fixes them (nvml.h NVML_GPU_INSTANCE_PROFILE_*)
NVML_ID = {(1, 1): 0, (1, 2): 9, (2, 2): 1, (3, 4): 2, (4, 4): 3, (7, 8): 4}
# a product name NVML would report for each model of libshared/migs.py
PRODUCTS = {
    "A100-40GB": "NVIDIA A100-SXM4-40GB",
    "A100-80GB": "NVIDIA A100-SXM4-80GB",
    "H100-80GB": "NVIDIA H100 80GB HBM3",
    "H200-141GB": "NVIDIA H200",
    "A30-24GB": "NVIDIA A30",
}
MIG_UUID = re.compile(r"^MIG-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

PRELUDE = """
import ctypes, json, os, sys, time
import pynvml

pynvml.nvmlLib = ctypes.CDLL(sys.argv[1])
pynvml._nvmlGetFunctionPointer_cache.clear()
pynvml.nvmlInit()
gpu = pynvml.nvmlDeviceGetHandleByIndex(0)
CI_PROFILE = {1: 0, 2: 1, 3: 2, 4: 3, 7: 4}


def err(call, *args):
    try:
        call(*args)
    except pynvml.NVMLError as exc:
        return exc.value
    return 0


def place(profile, start, size, on=gpu):
    p = pynvml.c_nvmlGpuInstancePlacement_t(start=start, size=size)
    return pynvml.nvmlDeviceCreateGpuInstanceWithPlacement(on, profile, ctypes.byref(p))


def compute(gi):
    slices = pynvml.nvmlDeviceGetGpuInstanceProfileInfo(
        gpu, pynvml.nvmlGpuInstanceGetInfo(gi).profileId
    ).sliceCount
    return pynvml.nvmlGpuInstanceCreateComputeInstance(gi, CI_PROFILE[slices])


def placements(profile, on=gpu):
    n = ctypes.c_uint(0)
    pynvml.nvmlDeviceGetGpuInstancePossiblePlacements(on, profile, None, ctypes.byref(n))
    room = (pynvml.c_nvmlGpuInstancePlacement_t * max(n.value, 1))()
    pynvml.nvmlDeviceGetGpuInstancePossiblePlacements(on, profile, room, ctypes.byref(n))
    return [[room[i].start, room[i].size] for i in range(n.value)]


def gpu_instances(profile, on=gpu):
    n = ctypes.c_uint(0)
    room = (pynvml.c_nvmlGpuInstance_t * 8)()
    pynvml.nvmlDeviceGetGpuInstances(on, profile, room, ctypes.byref(n))
    return [room[i] for i in range(n.value)]


def mig_devices(on=gpu):
    out, i = [], 0
    while True:
        try:
            m = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(on, i)
        except pynvml.NVMLError_NotFound:
            return out
        out.append(
            {"uuid": pynvml.nvmlDeviceGetUUID(m), "gi": pynvml.nvmlDeviceGetGpuInstanceId(m)}
        )
        i += 1


def out(value):
    print(json.dumps(value))
"""


def run(tmp_path: Path, devices: str, body: str, *, env: dict[str, str] | None = None) -> Any:
    """What scenario ``body`` prints (JSON) in a fresh process on the mock card of
    ``tmp_path`` with ``devices``."""
    proc = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(body), str(NVML)],
        env=environment(tmp_path, devices, env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def environment(tmp_path: Path, devices: str, extra: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VSLICE_", "CUDA_"))}
    env["VSLICE_MOCKGPU_STATE"] = str(tmp_path / "mock.state")
    env["VSLICE_MOCKGPU_DEVICES"] = devices
    env.update(extra or {})
    return env


# ---- the device list ------------------------------------------------------------------


def test_device_list_keeps_the_old_form_and_gives_names_and_mig_mode(
    native: None, tmp_path: Path
) -> None:
    devices = (
        "GPU-00000000-0000-4000-8000-00000000000a:1024,"
        "GPU-00000000-0000-4000-8000-00000000000b:2048:NVIDIA A30,"
        f"GPU-00000000-0000-4000-8000-00000000000c:4096:{A100}:mig"
    )
    found = run(
        tmp_path,
        devices,
        """
        rows = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            try:
                mode = pynvml.nvmlDeviceGetMigMode(h)
            except pynvml.NVMLError as exc:
                mode = exc.value
            rows.append([
                pynvml.nvmlDeviceGetUUID(h),
                pynvml.nvmlDeviceGetName(h),
                pynvml.nvmlDeviceGetMemoryInfo(h).total >> 20,
                mode,
            ])
        cuda = ctypes.CDLL(os.environ["MOCK_CUDA"])
        assert cuda.cuInit(0) == 0
        names = []
        for i in range(3):
            buf = ctypes.create_string_buffer(96)
            assert cuda.cuDeviceGetName(buf, 96, i) == 0
            names.append(buf.value.decode())
        out({"nvml": rows, "cuda": names})
        """,
        env={"MOCK_CUDA": str(CUDA)},
    )
    assert found["nvml"] == [
        ["GPU-00000000-0000-4000-8000-00000000000a", "vslice mock GPU", 1024, NOT_SUPPORTED],
        ["GPU-00000000-0000-4000-8000-00000000000b", "NVIDIA A30", 2048, [0, 0]],
        ["GPU-00000000-0000-4000-8000-00000000000c", A100, 4096, [1, 1]],
    ]
    assert found["cuda"] == ["vslice mock GPU", "NVIDIA A30", A100]


# ---- profiles -------------------------------------------------------------------------


@pytest.mark.parametrize("model", sorted(migs.GEOMETRIES))
def test_every_mig_model_offers_the_profiles_of_libshared_migs_with_nvml_ids(
    native: None, tmp_path: Path, model: str
) -> None:
    geometry = migs.GEOMETRIES[model]
    product = PRODUCTS[model]
    assert migs.geometry_for(product) == geometry
    found = run(
        tmp_path,
        f"{GPU}:40960:{product}:mig",
        """
        rows = []
        for pid in range(pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT):
            try:
                v2 = pynvml.nvmlDeviceGetGpuInstanceProfileInfo(gpu, pid, version=2)
            except pynvml.NVMLError_NotSupported:
                continue
            v1 = pynvml.nvmlDeviceGetGpuInstanceProfileInfo(gpu, pid, version=1)
            assert [v1.id, v1.sliceCount, v1.instanceCount, v1.memorySizeMB] == [
                v2.id, v2.sliceCount, v2.instanceCount, v2.memorySizeMB], pid
            rows.append({
                "id": v2.id, "name": v2.name, "slices": v2.sliceCount,
                "instances": v2.instanceCount, "memory_mib": v2.memorySizeMB,
                "sms": v2.multiprocessorCount, "placements": placements(pid),
            })
        out({"profiles": rows, "most": pynvml.nvmlDeviceGetMaxMigDeviceCount(gpu)})
        """,
    )
    expected: list[dict[str, Any]] = [
        {
            "id": NVML_ID[(p.compute, p.size)],
            "name": f"MIG {p.name}",
            "slices": p.compute,
            "instances": len(p.starts),
            "memory_mib": p.memory_mib,
            "sms": 14 * p.compute,
            "placements": [[s, p.size] for s in p.starts],
        }
        for p in geometry.profiles
    ]
    assert sorted(found["profiles"], key=lambda r: r["id"]) == sorted(
        expected, key=lambda r: r["id"]
    )
    assert found["most"] == (7 if geometry.slots == 8 else 4)


def test_profile_info_v_refuses_a_struct_of_another_version(native: None, tmp_path: Path) -> None:
    found = run(
        tmp_path,
        A100_MIG,
        """
        codes = []
        for version in (pynvml.nvmlGpuInstanceProfileInfo_v2, 0x01000098):
            info = pynvml.c_nvmlGpuInstanceProfileInfo_v2_t()
            info.version = version
            fn = pynvml._nvmlGetFunctionPointer("nvmlDeviceGetGpuInstanceProfileInfoV")
            codes.append(fn(gpu, 0, ctypes.byref(info)))
        gi = place(2, 0, 4)
        for version in (pynvml.nvmlComputeInstanceProfileInfo_v2, 0x01000088):
            info = pynvml.c_nvmlComputeInstanceProfileInfo_v2_t()
            info.version = version
            fn = pynvml._nvmlGetFunctionPointer("nvmlGpuInstanceGetComputeInstanceProfileInfoV")
            codes.append(fn(gi, 2, 0, ctypes.byref(info)))
        out(codes)
        """,
    )
    assert found == [SUCCESS, ARGUMENT_VERSION_MISMATCH, SUCCESS, ARGUMENT_VERSION_MISMATCH]


# ---- MIG mode and GPUs without MIG ----------------------------------------------------


@pytest.mark.parametrize(
    "devices",
    [
        f"{GPU}:16384",  # the old form: "vslice mock GPU"
        f"{GPU}:16384:Tesla V100-SXM2-16GB",
        f"{GPU}:95830:NVIDIA H100 NVL:mig",  # another layout, not tabled: no MIG
        f"{GPU}:95830:NVIDIA H100 PCIe 94GB:mig",
    ],
)
def test_a_gpu_without_mig_refuses_every_mig_call(
    native: None, tmp_path: Path, devices: str
) -> None:
    found = run(
        tmp_path,
        devices,
        """
        ENABLE = pynvml.NVML_DEVICE_MIG_ENABLE
        out({
            "mode": err(pynvml.nvmlDeviceGetMigMode, gpu),
            "set": err(pynvml.nvmlDeviceSetMigMode, gpu, ENABLE),
            "info": err(pynvml.nvmlDeviceGetGpuInstanceProfileInfo, gpu, 0),
            "create": err(pynvml.nvmlDeviceCreateGpuInstance, gpu, 0),
            "place": err(place, 0, 0, 1),
            "by_index": err(pynvml.nvmlDeviceGetMigDeviceHandleByIndex, gpu, 0),
            "by_id": err(pynvml.nvmlDeviceGetGpuInstanceById, gpu, 1),
            "most": pynvml.nvmlDeviceGetMaxMigDeviceCount(gpu),
            "is_mig": pynvml.nvmlDeviceIsMigDeviceHandle(gpu).value,
        })
        """,
    )
    assert found == {
        "mode": NOT_SUPPORTED,
        "set": NOT_SUPPORTED,
        "info": NOT_SUPPORTED,
        "create": NOT_SUPPORTED,
        "place": NOT_SUPPORTED,
        "by_index": NOT_SUPPORTED,
        "by_id": NOT_SUPPORTED,
        "most": 0,
        "is_mig": 0,
    }


def test_mig_mode_off_refuses_instances_until_set_mig_mode_enables_it(
    native: None, tmp_path: Path
) -> None:
    found = run(
        tmp_path,
        f"{GPU}:40960:{A100}",
        """
        ON, OFF = pynvml.NVML_DEVICE_MIG_ENABLE, pynvml.NVML_DEVICE_MIG_DISABLE
        steps = {"off": pynvml.nvmlDeviceGetMigMode(gpu)}
        steps["info_off"] = err(pynvml.nvmlDeviceGetGpuInstanceProfileInfo, gpu, 0)
        steps["create_off"] = err(place, 0, 0, 1)
        steps["most_off"] = pynvml.nvmlDeviceGetMaxMigDeviceCount(gpu)
        steps["activation"] = pynvml.nvmlDeviceSetMigMode(gpu, ON)
        steps["on"] = pynvml.nvmlDeviceGetMigMode(gpu)
        steps["most_on"] = pynvml.nvmlDeviceGetMaxMigDeviceCount(gpu)
        gi = place(0, 0, 1)
        steps["disable_with_instance"] = err(pynvml.nvmlDeviceSetMigMode, gpu, OFF)
        steps["still_on"] = pynvml.nvmlDeviceGetMigMode(gpu)
        pynvml.nvmlGpuInstanceDestroy(gi)
        steps["disable_empty"] = err(pynvml.nvmlDeviceSetMigMode, gpu, OFF)
        steps["off_again"] = pynvml.nvmlDeviceGetMigMode(gpu)
        steps["bad_mode"] = err(pynvml.nvmlDeviceSetMigMode, gpu, 2)
        out(steps)
        """,
    )
    assert found == {
        "off": [0, 0],
        "info_off": NOT_SUPPORTED,
        "create_off": NOT_SUPPORTED,
        "most_off": 0,
        "activation": SUCCESS,
        "on": [1, 1],
        "most_on": 7,
        "disable_with_instance": IN_USE,
        "still_on": [1, 1],
        "disable_empty": SUCCESS,
        "off_again": [0, 0],
        "bad_mode": INVALID_ARGUMENT,
    }


# ---- placements -----------------------------------------------------------------------

# (GPU, instances made first as (profile id, start, size), the one tried, expected code)
A30 = f"{GPU}:24576:NVIDIA A30:mig"
PLACEMENTS = [
    (A100_MIG, [], (0, 0, 1), SUCCESS),
    (A100_MIG, [], (0, 6, 1), SUCCESS),
    (A100_MIG, [], (0, 7, 1), INVALID_ARGUMENT),  # slice 7 only for larger profiles
    (A100_MIG, [], (9, 6, 2), SUCCESS),
    (A100_MIG, [], (9, 1, 2), INVALID_ARGUMENT),
    (A100_MIG, [], (1, 6, 2), INVALID_ARGUMENT),  # 2g starts at 0, 2, 4
    (A100_MIG, [], (2, 2, 4), INVALID_ARGUMENT),  # 3g starts at 0 or 4
    (A100_MIG, [], (2, 0, 2), INVALID_ARGUMENT),  # a size the profile does not have
    (A100_MIG, [], (3, 4, 4), INVALID_ARGUMENT),
    (A100_MIG, [], (4, 0, 8), SUCCESS),
    (A100_MIG, [], (5, 0, 8), NOT_SUPPORTED),  # no 8-slice profile on A100
    (A100_MIG, [], (0x11, 0, 1), NOT_SUPPORTED),
    (A100_MIG, [(0, 5, 1)], (2, 4, 4), INSUFFICIENT_RESOURCES),  # overlap
    (A100_MIG, [(2, 4, 4)], (3, 0, 4), SUCCESS),
    (A100_MIG, [(2, 4, 4)], (1, 4, 2), INSUFFICIENT_RESOURCES),
    (A100_MIG, [(4, 0, 8)], (0, 6, 1), INSUFFICIENT_RESOURCES),  # full GPU
    (A100_MIG, [(2, 0, 4), (1, 4, 2)], (0, 6, 1), SUCCESS),
    (A100_MIG, [(2, 0, 4), (1, 4, 2), (0, 6, 1)], (4, 0, 8), INSUFFICIENT_RESOURCES),
    (A30, [], (0, 3, 1), SUCCESS),
    (A30, [], (1, 1, 2), INVALID_ARGUMENT),
    (A30, [], (2, 0, 4), NOT_SUPPORTED),  # no 3g on A30
    (A30, [(1, 2, 2)], (3, 0, 4), INSUFFICIENT_RESOURCES),
    (A30, [(1, 2, 2)], (0, 1, 1), SUCCESS),
]


@pytest.mark.parametrize(
    ("devices", "before", "tried", "expected"),
    PLACEMENTS,
    ids=[
        f"{'A30' if d == A30 else 'A100'}-{b}-{t}-{e}".replace(" ", "") for d, b, t, e in PLACEMENTS
    ],
)
def test_a_placement_is_made_only_where_its_profile_starts_and_its_slices_are_free(
    native: None,
    tmp_path: Path,
    devices: str,
    before: list[tuple[int, int, int]],
    tried: tuple[int, int, int],
    expected: int,
) -> None:
    found = run(
        tmp_path,
        devices,
        f"""
        for profile, start, size in {before!r}:
            place(profile, start, size)
        code = err(place, *{tried!r})
        count = sum(len(gpu_instances(p)) for p in (0, 1, 2, 3, 4, 9) if not err(placements, p))
        out([code, count])
        """,
    )
    assert found == [expected, len(before) + (expected == SUCCESS)]


def test_possible_placements_and_capacity_list_only_the_starts_still_free(
    native: None, tmp_path: Path
) -> None:
    found = run(
        tmp_path,
        A100_MIG,
        """
        place(2, 4, 4)
        place(0, 1, 1)
        out({
            p: [placements(p), pynvml.nvmlDeviceGetGpuInstanceRemainingCapacity(gpu, p)]
            for p in (0, 9, 1, 2, 3, 4)
        })
        """,
    )
    assert found == {
        "0": [[[0, 1], [2, 1], [3, 1]], 3],
        "9": [[[2, 2]], 1],
        "1": [[[2, 2]], 1],
        "2": [[], 0],
        "3": [[], 0],
        "4": [[], 0],
    }


def test_create_gpu_instance_takes_the_first_free_start_and_the_lowest_free_id(
    native: None, tmp_path: Path
) -> None:
    found = run(
        tmp_path,
        A100_MIG,
        """
        def info(gi):
            i = pynvml.nvmlGpuInstanceGetInfo(gi)
            return [i.id, i.profileId, i.placement.start, i.placement.size]

        first = pynvml.nvmlDeviceCreateGpuInstance(gpu, 1)
        second = pynvml.nvmlDeviceCreateGpuInstance(gpu, 1)
        made = [info(first), info(second)]
        pynvml.nvmlGpuInstanceDestroy(first)
        third = pynvml.nvmlDeviceCreateGpuInstance(gpu, 1)
        made.append(info(third))
        made.append(info(pynvml.nvmlDeviceCreateGpuInstance(gpu, 1)))
        made.append(err(pynvml.nvmlDeviceCreateGpuInstance, gpu, 1))
        by_id = info(pynvml.nvmlDeviceGetGpuInstanceById(gpu, 2))
        out({"made": made, "by_id": by_id,
             "missing": err(pynvml.nvmlDeviceGetGpuInstanceById, gpu, 9)})
        """,
    )
    assert found == {
        "made": [[1, 1, 0, 2], [2, 1, 2, 2], [1, 1, 0, 2], [3, 1, 4, 2], INSUFFICIENT_RESOURCES],
        "by_id": [2, 1, 2, 2],
        "missing": NOT_FOUND,
    }


# ---- compute instances and MIG devices ------------------------------------------------


def test_a_gpu_instance_offers_one_compute_instance_covering_it(
    native: None, tmp_path: Path
) -> None:
    found = run(
        tmp_path,
        A100_MIG,
        """
        gi = place(2, 0, 4)
        offered = {}
        for cid in range(pynvml.NVML_COMPUTE_INSTANCE_PROFILE_COUNT):
            try:
                i = pynvml.nvmlGpuInstanceGetComputeInstanceProfileInfo(gi, cid, 0)
            except pynvml.NVMLError as exc:
                offered[cid] = exc.value
                continue
            offered[cid] = [i.id, i.sliceCount, i.instanceCount, i.multiprocessorCount, i.name]
        steps = {
            "offered": offered,
            "engines": err(pynvml.nvmlGpuInstanceGetComputeInstanceProfileInfo, gi, 2, 1),
            "wrong_size": err(pynvml.nvmlGpuInstanceCreateComputeInstance, gi, 0),
            "capacity": pynvml.nvmlGpuInstanceGetComputeInstanceRemainingCapacity(gi, 2),
        }
        ci = pynvml.nvmlGpuInstanceCreateComputeInstance(gi, 2)
        i = pynvml.nvmlComputeInstanceGetInfo(ci)
        steps["info"] = [i.id, i.profileId, i.placement.start, i.placement.size,
                         pynvml.nvmlGpuInstanceGetInfo(i.gpuInstance).id]
        steps["second"] = err(pynvml.nvmlGpuInstanceCreateComputeInstance, gi, 2)
        steps["capacity_after"] = pynvml.nvmlGpuInstanceGetComputeInstanceRemainingCapacity(gi, 2)
        steps["by_id"] = pynvml.nvmlComputeInstanceGetInfo(
            pynvml.nvmlGpuInstanceGetComputeInstanceById(gi, 0)).id
        steps["missing"] = err(pynvml.nvmlGpuInstanceGetComputeInstanceById, gi, 1)
        n = ctypes.c_uint(9)
        room = (pynvml.c_nvmlComputeInstance_t * 8)()
        pynvml.nvmlGpuInstanceGetComputeInstances(gi, 2, room, ctypes.byref(n))
        steps["listed"] = n.value
        out(steps)
        """,
    )
    ns = NOT_SUPPORTED
    assert found == {
        "offered": {
            "0": ns,
            "1": ns,
            "2": [2, 3, 1, 42, "MIG 3g.20gb"],
            "3": ns,
            "4": ns,
            "5": ns,
            "6": ns,
            "7": ns,
            "8": ns,
        },
        "engines": INVALID_ARGUMENT,
        "wrong_size": NOT_SUPPORTED,
        "capacity": 1,
        "info": [0, 2, 0, 3, 1],
        "second": INSUFFICIENT_RESOURCES,
        "capacity_after": 0,
        "by_id": 0,
        "missing": NOT_FOUND,
        "listed": 1,
    }


def test_a_gpu_and_compute_instance_make_a_mig_device_found_by_index_and_by_uuid(
    native: None, tmp_path: Path
) -> None:
    found = run(
        tmp_path,
        A100_MIG,
        """
        later = place(1, 2, 2)  # made first, listed second: MIG devices go by start
        first = place(0, 0, 1)
        lonely = place(0, 6, 1)  # no compute instance: not a MIG device
        compute(later)
        compute(first)
        listed = mig_devices()
        m = pynvml.nvmlDeviceGetHandleByUUID(listed[1]["uuid"])
        mem = pynvml.nvmlDeviceGetMemoryInfo(m)
        mem2 = pynvml.nvmlDeviceGetMemoryInfo(m, version=pynvml.nvmlMemory_v2)
        parent = pynvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(m)
        out({
            "listed": listed,
            "count": pynvml.nvmlDeviceGetCount(),
            "is_mig": pynvml.nvmlDeviceIsMigDeviceHandle(m).value,
            "gi": pynvml.nvmlDeviceGetGpuInstanceId(m),
            "ci": pynvml.nvmlDeviceGetComputeInstanceId(m),
            "uuid": pynvml.nvmlDeviceGetUUID(m),
            "name": pynvml.nvmlDeviceGetName(m),
            "memory": [mem.total, mem.used, mem.free, mem2.total, mem2.used],
            "parent": pynvml.nvmlDeviceGetUUID(parent),
            "gi_of_gpu": err(pynvml.nvmlDeviceGetGpuInstanceId, gpu),
            "unknown": err(pynvml.nvmlDeviceGetHandleByUUID, "MIG-00000000-0000-4000-8000-0"),
        })
        """,
    )
    listed = found.pop("listed")
    assert [d["gi"] for d in listed] == [2, 1]
    assert all(MIG_UUID.match(d["uuid"]) for d in listed), listed
    assert listed[0]["uuid"] != listed[1]["uuid"]
    total = 10240 * MIB  # 2g.10gb
    assert found == {
        "count": 1,
        "is_mig": 1,
        "gi": 1,
        "ci": 0,
        "uuid": listed[1]["uuid"],
        "name": f"{A100} MIG 2g.10gb",
        "memory": [total, 0, total, total, 0],
        "parent": GPU,
        "gi_of_gpu": NOT_SUPPORTED,
        "unknown": NOT_FOUND,
    }


def test_destroying_goes_compute_instance_first_and_leaves_no_mig_device(
    native: None, tmp_path: Path
) -> None:
    found = run(
        tmp_path,
        A100_MIG,
        """
        gi = place(2, 4, 4)
        ci = compute(gi)
        mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu, 0)
        uuid = pynvml.nvmlDeviceGetUUID(mig)
        steps = {"gi_first": err(pynvml.nvmlGpuInstanceDestroy, gi)}
        steps["ci"] = err(pynvml.nvmlComputeInstanceDestroy, ci)
        steps["ci_again"] = err(pynvml.nvmlComputeInstanceDestroy, ci)
        steps["old_handle"] = err(pynvml.nvmlDeviceGetUUID, mig)
        steps["old_uuid"] = err(pynvml.nvmlDeviceGetHandleByUUID, uuid)
        steps["by_index"] = err(pynvml.nvmlDeviceGetMigDeviceHandleByIndex, gpu, 0)
        steps["gi"] = err(pynvml.nvmlGpuInstanceDestroy, gi)
        steps["gi_again"] = err(pynvml.nvmlGpuInstanceGetInfo, gi)
        steps["left"] = len(gpu_instances(2))
        steps["whole_gpu"] = err(place, 4, 0, 8)
        out(steps)
        """,
    )
    assert found == {
        "gi_first": IN_USE,
        "ci": SUCCESS,
        "ci_again": INVALID_ARGUMENT,
        "old_handle": INVALID_ARGUMENT,
        "old_uuid": NOT_FOUND,
        "by_index": NOT_FOUND,
        "gi": SUCCESS,
        "gi_again": INVALID_ARGUMENT,
        "left": 0,
        "whole_gpu": SUCCESS,
    }


def test_another_process_sees_and_may_destroy_the_instance_one_process_made(
    native: None, tmp_path: Path
) -> None:
    made = run(
        tmp_path,
        A100_MIG,
        """
        gi = place(1, 2, 2)
        compute(gi)
        out(pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu, 0)))
        """,
    )
    seen = run(
        tmp_path,
        A100_MIG,
        """
        gis = gpu_instances(1)
        info = pynvml.nvmlGpuInstanceGetInfo(gis[0])
        listed = mig_devices()
        for gi in gis:
            cis = (pynvml.c_nvmlComputeInstance_t * 8)()
            n = ctypes.c_uint(0)
            pynvml.nvmlGpuInstanceGetComputeInstances(gi, 1, cis, ctypes.byref(n))
            pynvml.nvmlComputeInstanceDestroy(cis[0])
            pynvml.nvmlGpuInstanceDestroy(gi)
        out({"listed": listed, "placement": [info.id, info.placement.start, info.placement.size]})
        """,
    )
    after = run(tmp_path, A100_MIG, "out([len(gpu_instances(1)), mig_devices()])")
    assert seen == {"listed": [{"uuid": made, "gi": 1}], "placement": [1, 2, 2]}
    assert after == [0, []]


def test_an_instance_made_again_in_the_same_place_is_a_new_mig_device(
    native: None, tmp_path: Path
) -> None:
    body = """
    gi = place(0, 3, 1)
    compute(gi)
    out([pynvml.nvmlGpuInstanceGetInfo(gi).id, mig_devices()[0]["uuid"]])
    """
    destroy = """
    for gi in gpu_instances(0):
        cis = (pynvml.c_nvmlComputeInstance_t * 8)()
        n = ctypes.c_uint(0)
        pynvml.nvmlGpuInstanceGetComputeInstances(gi, 0, cis, ctypes.byref(n))
        pynvml.nvmlComputeInstanceDestroy(cis[0])
        pynvml.nvmlGpuInstanceDestroy(gi)
    out(0)
    """
    first = run(tmp_path, A100_MIG, body)
    run(tmp_path, A100_MIG, destroy)
    second = run(tmp_path, A100_MIG, body)
    assert first[0] == second[0] == 1
    assert MIG_UUID.match(first[1]) and MIG_UUID.match(second[1])
    assert first[1] != second[1]


def test_processes_racing_for_one_placement_make_it_once(native: None, tmp_path: Path) -> None:
    racers = 8
    go = tmp_path / "go"
    body = f"""
    open(sys.argv[2], "w").close()
    while not os.path.exists({str(go)!r}):
        time.sleep(0.001)
    out([err(place, 2, 0, 4), err(pynvml.nvmlDeviceCreateGpuInstance, gpu, 0)])
    """
    env = environment(tmp_path, A100_MIG, None)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                PRELUDE + textwrap.dedent(body),
                str(NVML),
                str(tmp_path / f"r{i}"),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(racers)
    ]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"r{i}").exists() for i in range(racers)):
        assert time.monotonic() < deadline, "racers did not start"
        time.sleep(0.01)
    go.touch()
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=60)
        assert p.returncode == 0, stderr
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    placed = sorted(r[0] for r in results)
    assert placed == [SUCCESS] + [INSUFFICIENT_RESOURCES] * (racers - 1)
    # the 3g took slices 0-3; 1g may start at 4, 5 or 6: three of the racers got one
    singles = sorted(r[1] for r in results)
    assert singles == [SUCCESS] * 3 + [INSUFFICIENT_RESOURCES] * (racers - 3)
    listed = run(
        tmp_path,
        A100_MIG,
        "out([pynvml.nvmlGpuInstanceGetInfo(g).placement.start for g in gpu_instances(0)])",
    )
    assert listed == [4, 5, 6]


# ---- CUDA on a MIG device -------------------------------------------------------------

CUDA_BODY = """
from ctypes import byref, c_int, c_size_t, c_ulonglong, c_void_p
GIB = 1 << 30
cuda = ctypes.CDLL(os.environ["MOCK_CUDA"])
steps = {"init": cuda.cuInit(0)}
n = c_int(-1)
cuda.cuDeviceGetCount(byref(n))
steps["count"] = n.value
total = c_size_t(0)
cuda.cuDeviceTotalMem_v2(byref(total), 0)
steps["total"] = total.value
name = ctypes.create_string_buffer(96)
cuda.cuDeviceGetName(name, 96, 0)
steps["name"] = name.value.decode()
ctx = c_void_p()
assert cuda.cuCtxCreate_v2(byref(ctx), 0, 0) == 0
free, tot = c_size_t(0), c_size_t(0)
cuda.cuMemGetInfo_v2(byref(free), byref(tot))
steps["mem_info"] = [free.value, tot.value]
held = c_ulonglong(0)
steps["alloc_4g"] = cuda.cuMemAlloc_v2(byref(held), c_size_t(4 * GIB))
more = c_ulonglong(0)
steps["alloc_2g_more"] = cuda.cuMemAlloc_v2(byref(more), c_size_t(2 * GIB))
mig = pynvml.nvmlDeviceGetHandleByUUID(os.environ["MIG_UUID"])
steps["nvml_used"] = [pynvml.nvmlDeviceGetMemoryInfo(mig).used,
                      pynvml.nvmlDeviceGetMemoryInfo(gpu).used]
procs = pynvml.nvmlDeviceGetComputeRunningProcesses(mig)
steps["procs"] = [[p.pid == os.getpid(), p.usedGpuMemory, p.gpuInstanceId] for p in procs]
procs = pynvml.nvmlDeviceGetComputeRunningProcesses(gpu)
steps["gpu_procs"] = [[p.pid == os.getpid(), p.usedGpuMemory, p.gpuInstanceId] for p in procs]
ci = pynvml.nvmlGpuInstanceGetComputeInstanceById(gpu_instances(0)[0], 0)
steps["destroy_held"] = err(pynvml.nvmlComputeInstanceDestroy, ci)
assert cuda.cuMemFree_v2(held) == 0
steps["nvml_used_after"] = pynvml.nvmlDeviceGetMemoryInfo(gpu).used
steps["destroy_free"] = err(pynvml.nvmlComputeInstanceDestroy, ci)
steps["alloc_after_destroy"] = cuda.cuMemAlloc_v2(byref(more), c_size_t(1 << 20))
out(steps)
"""


@pytest.mark.parametrize("prefix", [0, 12], ids=["full-uuid", "unique-prefix"])
def test_cuda_sees_a_mig_device_as_one_device_with_the_instances_memory(
    native: None, tmp_path: Path, prefix: int
) -> None:
    uuid = run(
        tmp_path,
        A100_MIG,
        """
        compute(place(0, 2, 1))  # 1g.5gb
        out(mig_devices()[0]["uuid"])
        """,
    )
    visible = uuid[:prefix] if prefix else uuid
    found = run(
        tmp_path,
        A100_MIG,
        CUDA_BODY,
        env={"MOCK_CUDA": str(CUDA), "CUDA_VISIBLE_DEVICES": visible, "MIG_UUID": uuid},
    )
    total = 5120 * MIB
    assert found == {
        "init": 0,
        "count": 1,
        "total": total,
        "name": f"{A100} MIG 1g.5gb",
        "mem_info": [total, total],
        "alloc_4g": 0,
        "alloc_2g_more": CUDA_ERROR_OUT_OF_MEMORY,
        "nvml_used": [4 << 30, 4 << 30],  # charged to the instance and its GPU
        "procs": [[True, 4 << 30, 1]],
        "gpu_procs": [[True, 4 << 30, 1]],  # the GPU's aggregate, with the instance used
        "destroy_held": IN_USE,
        "nvml_used_after": 0,
        "destroy_free": SUCCESS,
        "alloc_after_destroy": CUDA_ERROR_OUT_OF_MEMORY,  # its compute instance is gone
    }


@pytest.mark.parametrize(
    ("visible", "expected"),
    [
        ("{mig},0", [2, [5120, 40960]]),
        ("0,{mig}", [2, [40960, 5120]]),
        ("MIG-ffffffff,0", [CUDA_ERROR_NO_DEVICE, []]),  # names nothing: ends the list
        ("{mig},MIG-ffffffff,0", [1, [5120]]),
        ("MIG-", [1, [5120]]),  # a unique prefix
    ],
)
def test_cuda_visible_devices_mixes_mig_devices_and_gpus_in_order(
    native: None, tmp_path: Path, visible: str, expected: list[Any]
) -> None:
    uuid = run(tmp_path, A100_MIG, 'compute(place(0, 0, 1))\nout(mig_devices()[0]["uuid"])')
    value = visible.format(mig=uuid)
    found = run(
        tmp_path,
        A100_MIG,
        """
        from ctypes import byref, c_int, c_size_t
        cuda = ctypes.CDLL(os.environ["MOCK_CUDA"])
        r = cuda.cuInit(0)
        n = c_int(0)
        cuda.cuDeviceGetCount(byref(n))
        totals = []
        for i in range(n.value if r == 0 else 0):
            t = c_size_t(0)
            cuda.cuDeviceTotalMem_v2(byref(t), i)
            totals.append(t.value >> 20)
        out([n.value if r == 0 else r, totals])
        """,
        env={"MOCK_CUDA": str(CUDA), "CUDA_VISIBLE_DEVICES": value},
    )
    assert found == expected


def test_nvml_error_string_names_the_codes_mig_calls_return(native: None, tmp_path: Path) -> None:
    found = run(
        tmp_path,
        A100_MIG,
        "out([pynvml.nvmlErrorString(c) for c in (3, 19, 23, 25)])",
    )
    assert "Unknown Error" not in found
    assert len(set(found)) == 4
