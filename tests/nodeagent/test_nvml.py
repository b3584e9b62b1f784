"""The NVML backend (pynvml) against the mock NVML, and the mock driver's visible devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from services.nodeagent.core import registrations
from tests.libvgpu import harness

MIB = 1 << 20
DEVICES = "GPU-11111111-aaaa:1024,GPU-22222222-bbbb:4096"


def nvml(tmp_path: Path, *args: str) -> object:
    env = {
        **os.environ,
        "LD_LIBRARY_PATH": str(harness.MOCK_DIR),
        "VSLICE_MOCKGPU_STATE": str(tmp_path / "mock.state"),
        "VSLICE_MOCKGPU_DEVICES": DEVICES,
    }
    out = subprocess.run(
        [sys.executable, "-m", "tests.nodeagent.nvmlcheck", *args],
        cwd=harness.ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_nvml_discovers_every_gpu_with_its_uuid_memory_minor_and_type(
    native: None, tmp_path: Path
) -> None:
    found = nvml(tmp_path, "discover")
    assert [(g["uuid"], g["index"], g["memory_mib"], g["minor"]) for g in found] == [
        ("GPU-11111111-aaaa", 0, 1024, 0),  # the mock NVML's minor is the index
        ("GPU-22222222-bbbb", 1, 4096, 1),
    ]
    assert {g["type"] for g in found} == {"NVIDIA-vslice mock GPU"}


def test_nvml_reads_a_host_process_and_its_device_memory(native: None, tmp_path: Path) -> None:
    box = harness.Container(root=tmp_path, preload=None, env={"VSLICE_MOCKGPU_DEVICES": DEVICES})
    box.env["VSLICE_MOCKGPU_STATE"] = str(tmp_path / "mock.state")
    holder = box.start("probe", "device", "1", "alloc", "96m", "ready", "wait")
    try:
        holder.read_until("ready")
        read = nvml(tmp_path, "read")
    finally:
        holder.finish()
    assert [(d["uuid"], d["used_bytes"]) for d in read["devices"]] == [
        ("GPU-11111111-aaaa", 0),
        ("GPU-22222222-bbbb", 96 * MIB),
    ]
    assert [(p["pid"], p["uuid"], p["used_bytes"]) for p in read["processes"]] == [
        (holder.pid, "GPU-22222222-bbbb", 96 * MIB)
    ]
    after = nvml(tmp_path, "read")
    assert after["processes"] == [] and after["devices"][1]["used_bytes"] == 0


def test_nvml_delivers_xid_events_and_only_device_faults_make_a_gpu_unhealthy(
    native: None, tmp_path: Path
) -> None:
    seen = nvml(tmp_path, "xids", "0:13", "1:79")
    assert seen == [["GPU-11111111-aaaa", 13], ["GPU-22222222-bbbb", 79]]
    faults = {uuid for uuid, xid in seen if registrations.is_device_fault(xid)}
    assert faults == {"GPU-22222222-bbbb"}


def test_the_mock_driver_shows_only_the_visible_devices_in_their_order(
    native: None, tmp_path: Path
) -> None:
    box = harness.Container(root=tmp_path, preload=None, env={"VSLICE_MOCKGPU_DEVICES": DEVICES})
    by_uuid = box.run("probe", "meminfo", env={"CUDA_VISIBLE_DEVICES": "GPU-2222"})
    assert by_uuid.of("meminfo")[0].int("total") == 4096 * MIB
    by_index = box.run("probe", "meminfo", env={"CUDA_VISIBLE_DEVICES": "1,0"})
    assert by_index.of("meminfo")[0].int("total") == 4096 * MIB
    none = subprocess.run(
        [str(harness.BUILD / "probe"), "meminfo"],
        env=box.environment({"CUDA_VISIBLE_DEVICES": "7"}),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert none.returncode != 0  # no visible device: cuInit fails as on a real driver


def test_libvgpu_matches_nvml_devices_to_its_slice_by_uuid_when_cuda_sees_a_subset(
    native: None, tmp_path: Path
) -> None:
    # a host process in a slice of the second GPU: NVML still lists both
    box = harness.Container(
        root=tmp_path,
        env={
            "VSLICE_MOCKGPU_DEVICES": DEVICES,
            "CUDA_VISIBLE_DEVICES": "GPU-22222222-bbbb",
            "CUDA_DEVICE_MEMORY_LIMIT_0": "300m",
        },
    )
    result = box.run("probe", "meminfo", "alloc", "64m", "nvmlat", "0", "nvmlat", "1")
    assert result.of("meminfo")[0].int("total") == 300 * MIB
    first, second = result.of("nvmlat")
    assert (first.int("total"), first.int("used")) == (1024 * MIB, 0)  # not the slice's GPU
    assert (second.int("total"), second.int("used")) == (300 * MIB, 64 * MIB)
