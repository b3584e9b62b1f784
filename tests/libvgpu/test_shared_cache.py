"""All processes of a container share one accounting file, safely."""

from __future__ import annotations

import mmap
import struct
import subprocess
import time

import pytest

from services.nodeagent.adapters import cachefiles
from services.nodeagent.core import sharedcaches
from tests.libvgpu import harness
from tests.libvgpu.harness import CUDA_ERROR_OUT_OF_MEMORY, CUDA_SUCCESS, MIB


def test_two_processes_racing_for_the_last_mib_cannot_both_win(
    container: harness.Container,
) -> None:
    container.env["CUDA_DEVICE_MEMORY_LIMIT"] = "1m"
    for _ in range(10):
        racers = [container.start("probe", "wait", "alloc", "1m", "wait") for _ in range(2)]
        for racer in racers:
            racer.read_until("waiting")
        for racer in racers:
            racer.resume()
        codes = sorted(racer.read_line().int("rc") for racer in racers)
        for racer in racers:
            racer.finish()
        assert codes == [CUDA_SUCCESS, CUDA_ERROR_OUT_OF_MEMORY]


def test_eight_processes_filling_the_slice_together_never_pass_it(
    container: harness.Container,
) -> None:
    container.env["CUDA_DEVICE_MEMORY_LIMIT"] = "64m"
    fillers = [container.start("probe", "wait", "fill", "256k", "wait") for _ in range(8)]
    for filler in fillers:
        filler.read_until("waiting")
    for filler in fillers:
        filler.resume()
    counts = [filler.read_line().int("count") for filler in fillers]
    cache = cachefiles.read_shared_cache(container.cache)
    for filler in fillers:
        filler.finish()
    assert sum(counts) == 64 * 4
    assert cache.devices[0].used_bytes == 64 * MIB
    assert sorted(p.charged_bytes[0] for p in cache.processes) == sorted(
        c * 256 * 1024 for c in counts
    )


def test_cuMemGetInfo_and_nvml_report_the_containers_usage_over_all_its_processes(
    container: harness.Container,
) -> None:
    container.env["CUDA_DEVICE_MEMORY_LIMIT"] = "100m"
    holder = container.start("probe", "alloc", "30m", "wait")
    holder.read_until("waiting")
    result = container.run("probe", "alloc", "20m", "meminfo", "meminfo1", "nvml", "nvml2")
    holder.finish()
    for command in ("meminfo", "meminfo1"):
        line = result.of(command)[0]
        assert (line.int("total"), line.int("free")) == (100 * MIB, 50 * MIB)
    for command in ("nvml", "nvml2"):
        line = result.of(command)[0]
        assert (line.int("total"), line.int("used"), line.int("free")) == (
            100 * MIB,
            50 * MIB,
            50 * MIB,
        )


def test_free_memory_is_clamped_at_zero_when_usage_exceeds_the_slice(
    container: harness.Container,
) -> None:
    container.env["CUDA_DEVICE_MEMORY_LIMIT"] = "100m"
    probe = container.start("probe", "alloc", "10m", "wait", "meminfo", "nvml")
    probe.read_until("waiting")
    used_offset = sharedcaches.ACCOUNTS_OFFSET
    with container.cache.open("r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        struct.pack_into("<Q", m, used_offset, 150 * MIB)
    result = probe.finish()
    assert result.of("meminfo")[0].int("free") == 0
    nvml = result.of("nvml")[0]
    assert (nvml.int("total"), nvml.int("used"), nvml.int("free")) == (100 * MIB, 150 * MIB, 0)


def test_memory_of_a_sigkilled_process_is_reclaimed_for_the_others(
    container: harness.Container,
) -> None:
    container.env["CUDA_DEVICE_MEMORY_LIMIT"] = "100m"
    victim = container.start("probe", "alloc", "60m", "wait")
    victim.read_until("waiting")
    assert [p.pid for p in cachefiles.read_shared_cache(container.cache).processes] == [victim.pid]
    victim.kill()
    result = container.run("probe", "alloc", "60m", "meminfo")
    assert result.of("alloc")[0].int("rc") == CUDA_SUCCESS
    assert result.of("meminfo")[0].int("free") == 40 * MIB
    assert cachefiles.read_shared_cache(container.cache).devices[0].used_bytes == 0


def test_a_later_process_with_other_limits_follows_the_file_and_says_so(
    container: harness.Container,
) -> None:
    first = container.start("probe", "meminfo", "wait", env={"CUDA_DEVICE_MEMORY_LIMIT": "100m"})
    first.read_until("waiting")
    later = container.run("probe", "meminfo", env={"CUDA_DEVICE_MEMORY_LIMIT": "200m"})
    first.finish()
    assert later.of("meminfo")[0].int("total") == 100 * MIB
    assert "following the shared cache" in later.stderr


def test_the_python_reader_decodes_a_file_written_by_libvgpu(
    container: harness.Container,
) -> None:
    container.env.update({"CUDA_DEVICE_MEMORY_LIMIT": "100m", "CUDA_DEVICE_SM_LIMIT": "50"})
    before_ns = time.time_ns()
    probe = container.start("probe", "alloc", "30m", "launch", "kernel", "0", "3", "wait")
    probe.read_until("waiting")
    cache = cachefiles.read_shared_cache(container.cache)
    probe.finish()
    assert cache.version == 2
    assert cache.sm_policy == "default"
    assert cache.creator_pid == probe.pid
    assert before_ns - 10**9 < cache.created_ns < time.time_ns()
    device = cache.devices[0]
    assert (device.limit_bytes, device.used_bytes, device.sm_limit_percent) == (
        100 * MIB,
        30 * MIB,
        50,
    )
    assert [d.limit_bytes for d in cache.devices[1:]] == [100 * MIB] * 15
    (process,) = cache.processes
    assert process.pid == probe.pid
    assert process.charged_bytes == (30 * MIB,) + (0,) * 15
    assert process.launches == 3
    # CLOCK_REALTIME_COARSE: up to one 4 ms tick behind
    assert before_ns - 10**8 < cache.last_kernel_ns < time.time_ns()


def test_the_python_layout_matches_the_c_header(native: None) -> None:
    out = subprocess.run(
        [str(harness.BUILD / "layout")], capture_output=True, text=True, check=True
    ).stdout
    offsets = {}
    for raw in out.splitlines():
        name, offset, size = raw.split()
        offsets[name] = (int(offset), int(size))
    assert offsets["magic"][1] == sharedcaches.MAGIC
    assert offsets["version"][1] == sharedcaches.VERSION
    assert offsets["vgpu_cache.size"][1] == sharedcaches.FILE_BYTES
    assert offsets["vgpu_cache.devices"] == (
        sharedcaches.DEVICES_OFFSET,
        sharedcaches.MAX_DEVICES * sharedcaches.DEVICE_BYTES,
    )
    assert offsets["vgpu_cache.accounts"] == (
        sharedcaches.ACCOUNTS_OFFSET,
        sharedcaches.MAX_DEVICES * sharedcaches.ACCOUNT_BYTES,
    )
    assert offsets["vgpu_cache.slots"] == (
        sharedcaches.SLOTS_OFFSET,
        sharedcaches.MAX_SLOTS * sharedcaches.SLOT_BYTES,
    )
    # the reader's struct formats put these fields where the compiler does
    assert offsets["vgpu_cache_header.created_ns"] == (40, 8)
    assert offsets["vgpu_cache_account.used"] == (0, 16)
    assert offsets["vgpu_cache_device.sm_limit_percent"] == (16, 4)
    assert offsets["vgpu_cache_device.sm_observed_ns"] == (96, 8)
    assert offsets["vgpu_cache_slot.generation"] == (4, 4)
    assert offsets["vgpu_cache_slot.last_kernel_ns"] == (16, 8)
    assert offsets["vgpu_cache_slot.op_seq"] == (32, 8)
    assert offsets["vgpu_cache_slot.op"] == (48, 40)
    assert offsets["vgpu_cache_slot.charged"] == (96, 16 * sharedcaches.MAX_DEVICES)


def _damage(data: bytearray, how: str) -> bytes:
    if how == "short header":
        return bytes(data[:10])
    if how == "short devices":
        return bytes(data[:1000])
    if how == "short slots":
        return bytes(data[:3000])
    if how == "magic":
        struct.pack_into("<I", data, 0, 0xDEADBEEF)
    elif how == "version":
        struct.pack_into("<I", data, 4, 1)
    elif how == "slot count":
        struct.pack_into("<I", data, 16, 7)
    elif how == "policy":
        struct.pack_into("<I", data, 28, 9)
    elif how == "sm limit":
        struct.pack_into("<I", data, sharedcaches.DEVICES_OFFSET + 16, 101)
    elif how == "pid":
        struct.pack_into("<i", data, sharedcaches.SLOTS_OFFSET, -5)
    return bytes(data)


@pytest.mark.parametrize(
    ("how", "field"),
    [
        ("short header", "header"),
        ("short devices", "devices"),
        ("short slots", "slots"),
        ("magic", "magic"),
        ("version", "version"),
        ("slot count", "slot_count"),
        ("policy", "sm_policy"),
        ("sm limit", "devices[0].sm_limit_percent"),
        ("pid", "slots[0].pid"),
    ],
)
def test_the_python_reader_names_the_field_of_a_damaged_file(
    container: harness.Container, how: str, field: str
) -> None:
    container.env["CUDA_DEVICE_MEMORY_LIMIT"] = "100m"
    container.run("probe", "alloc", "1m")
    data = bytearray(container.cache.read_bytes())
    assert sharedcaches.decode(bytes(data)).devices[0].limit_bytes == 100 * MIB
    with pytest.raises(sharedcaches.SharedCacheError) as caught:
        sharedcaches.decode(_damage(data, how))
    assert caught.value.field == field
    assert field in str(caught.value)
