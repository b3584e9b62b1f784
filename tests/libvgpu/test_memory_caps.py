"""Every device-memory path is charged against the slice before the driver sees it."""

from __future__ import annotations

import pytest

from tests.libvgpu import harness
from tests.libvgpu.harness import CUDA_ERROR_OUT_OF_MEMORY, CUDA_SUCCESS, MIB

# (allocation command, its arguments for 60 MiB): the pitched one asks for
# 61440 bytes x 1024 rows, already a multiple of the mock's 512-byte pitch;
# arrays are 8-bit, one channel
ALLOCATION_PATHS = [
    pytest.param("alloc", ["60m"], id="cuMemAlloc_v2"),
    pytest.param("alloc1", ["60m"], id="cuMemAlloc"),
    pytest.param("managed", ["60m"], id="cuMemAllocManaged"),
    pytest.param("pitch", ["61440", "1024"], id="cuMemAllocPitch_v2"),
    pytest.param("pitch1", ["61440", "1024"], id="cuMemAllocPitch"),
    pytest.param("vmm", ["60m"], id="cuMemCreate"),
    pytest.param("async", ["60m"], id="cuMemAllocAsync"),
    pytest.param("pool", ["60m"], id="cuMemAllocFromPoolAsync"),
    pytest.param("array", ["61440", "1024"], id="cuArrayCreate_v2"),
    pytest.param("array3d", ["61440", "32", "32"], id="cuArray3DCreate_v2"),
    pytest.param("mipmap", ["61440", "1024", "1"], id="cuMipmappedArrayCreate"),
]


@pytest.mark.parametrize(("command", "args"), ALLOCATION_PATHS)
def test_every_allocation_path_is_refused_past_the_slice_without_calling_the_driver(
    container: harness.Container, command: str, args: list[str]
) -> None:
    container.env["CUDA_DEVICE_MEMORY_LIMIT"] = "100m"
    result = container.run("probe", command, *args, command, *args, "meminfo", "drivercalls")
    first, second = result.of(command)
    assert first.int("rc") == CUDA_SUCCESS
    assert second.int("rc") == CUDA_ERROR_OUT_OF_MEMORY
    assert result.of("drivercalls")[0].int("count") == 1
    info = result.of("meminfo")[0]
    assert info.int("total") == 100 * MIB
    assert info.int("free") == 40 * MIB


@pytest.mark.parametrize(("command", "args"), ALLOCATION_PATHS)
def test_a_free_credits_exactly_what_was_charged(
    container: harness.Container, command: str, args: list[str]
) -> None:
    container.env["CUDA_DEVICE_MEMORY_LIMIT"] = "100m"
    # a stream-ordered pool keeps what is freed into it until a synchronization
    result = container.run("probe", command, *args, "meminfo", "free", "0", "sync", "meminfo")
    charged, freed = result.of("meminfo")
    assert charged.int("free") == 40 * MIB
    assert result.of("free")[0].int("rc") == CUDA_SUCCESS
    assert freed.int("free") == 100 * MIB


def test_a_mipmapped_array_is_charged_every_level(container: harness.Container) -> None:
    container.env["CUDA_DEVICE_MEMORY_LIMIT"] = "100m"
    result = container.run("probe", "mipmap", "1024", "1024", "3", "meminfo")
    assert result.of("mipmap")[0].int("rc") == CUDA_SUCCESS
    levels = 1024 * 1024 + 512 * 512 + 256 * 256
    assert result.of("meminfo")[0].int("free") == 100 * MIB - levels


def test_memory_a_pool_keeps_after_cuMemFreeAsync_counts_against_the_slice_until_trimmed(
    container: harness.Container,
) -> None:
    # as PyTorch and TensorFlow set it: the pool keeps everything freed into it
    container.env["CUDA_DEVICE_MEMORY_LIMIT"] = "100m"
    result = container.run(
        "probe",
        "poolkeep",
        "async", "60m", "free", "0", "sync", "meminfo",
        "alloc", "50m",
        "async", "60m", "meminfo",
        "free", "1", "trim", "0", "meminfo",
        "alloc", "50m",
    )  # fmt: skip
    kept, reused, trimmed = (line.int("free") for line in result.of("meminfo"))
    assert [line.int("rc") for line in result.of("async")] == [CUDA_SUCCESS, CUDA_SUCCESS]
    assert [line.int("rc") for line in result.of("alloc")] == [
        CUDA_ERROR_OUT_OF_MEMORY,
        CUDA_SUCCESS,
    ]
    assert (kept, reused, trimmed) == (40 * MIB, 40 * MIB, 100 * MIB)


def test_graph_memory_counts_against_the_slice_until_trimmed(container: harness.Container) -> None:
    # the device's graph memory pool keeps what a launched graph allocated,
    # freed or not, until cuDeviceGraphMemTrim
    container.env["CUDA_DEVICE_MEMORY_LIMIT"] = "100m"
    result = container.run(
        "probe",
        "graph", "60m", "meminfo",
        "alloc", "50m",
        "graph", "60m", "meminfo",
        "graphtrim", "meminfo",
        "alloc", "50m",
    )  # fmt: skip
    assert [line.int("rc") for line in result.of("graph")] == [CUDA_SUCCESS, CUDA_SUCCESS]
    assert [line.int("rc") for line in result.of("alloc")] == [
        CUDA_ERROR_OUT_OF_MEMORY,
        CUDA_SUCCESS,
    ]
    assert [line.int("free") for line in result.of("meminfo")] == [40 * MIB, 40 * MIB, 100 * MIB]


def test_a_graph_allocation_past_the_slice_is_refused_when_the_node_is_added(
    container: harness.Container,
) -> None:
    container.env["CUDA_DEVICE_MEMORY_LIMIT"] = "100m"
    result = container.run("probe", "graph", "200m", "drivercalls", "meminfo")
    assert result.of("graph")[0].int("rc") == CUDA_ERROR_OUT_OF_MEMORY
    assert result.of("drivercalls")[0].int("count") == 0
    assert result.of("meminfo")[0].int("free") == 100 * MIB


@pytest.mark.parametrize("command", ["pitch", "pitch1"])
def test_a_pitched_allocation_is_charged_the_real_pitch_times_height(
    container: harness.Container, command: str
) -> None:
    container.env["CUDA_DEVICE_MEMORY_LIMIT"] = "100m"
    result = container.run("probe", command, "1000", "100", "meminfo")
    line = result.of(command)[0]
    assert line.int("pitch") == 1024
    assert result.of("meminfo")[0].int("free") == 100 * MIB - 1024 * 100


def test_pitch_padding_that_passes_the_slice_is_given_back_and_refused(
    container: harness.Container,
) -> None:
    # 1000 x 100 bytes fit, the 1024-byte pitch the driver picks does not
    container.env["CUDA_DEVICE_MEMORY_LIMIT"] = str(1000 * 100 + 100)
    result = container.run("probe", "pitch", "1000", "100", "meminfo")
    assert result.of("pitch")[0].int("rc") == CUDA_ERROR_OUT_OF_MEMORY
    assert result.of("meminfo")[0].int("free") == 1000 * 100 + 100


def test_a_free_of_an_untracked_pointer_reaches_the_driver_untouched(
    container: harness.Container,
) -> None:
    container.env["CUDA_DEVICE_MEMORY_LIMIT"] = "100m"
    result = container.run(
        "probe", "alloc", "10m", "raw", "1m", "meminfo", "free", "1", "free", "1", "meminfo"
    )
    first_free, double_free = result.of("free")
    assert first_free.int("rc") == CUDA_SUCCESS
    # the mock's own answer to a pointer it no longer has: libvgpu forwarded it
    assert double_free.int("rc") == harness.CUDA_ERROR_INVALID_VALUE
    assert [m.int("free") for m in result.of("meminfo")] == [90 * MIB, 90 * MIB]


def test_host_located_cuMemCreate_is_not_device_memory(container: harness.Container) -> None:
    container.env["CUDA_DEVICE_MEMORY_LIMIT"] = "10m"
    result = container.run("probe", "vmmhost", "40m", "meminfo")
    assert result.of("vmmhost")[0].int("rc") == CUDA_SUCCESS
    assert result.of("meminfo")[0].int("free") == 10 * MIB


@pytest.mark.parametrize(
    ("value", "limit_bytes"),
    [
        ("1073741824", 1 << 30),
        ("1048576k", 1 << 30),
        ("1024m", 1 << 30),
        ("1g", 1 << 30),
        ("3G", 3 << 30),
        ("4000m", 4000 * MIB),
    ],
)
def test_limits_use_hamis_size_format(
    container: harness.Container, value: str, limit_bytes: int
) -> None:
    container.env["CUDA_DEVICE_MEMORY_LIMIT"] = value
    info = container.run("probe", "meminfo").of("meminfo")[0]
    assert info.int("total") == limit_bytes


def test_a_per_device_limit_overrides_the_container_wide_one(
    container: harness.Container,
) -> None:
    container.env.update(
        {
            "VSLICE_MOCKGPU_DEVICES": "GPU-aaaa:16384,GPU-bbbb:16384",
            "CUDA_DEVICE_MEMORY_LIMIT": "1g",
            "CUDA_DEVICE_MEMORY_LIMIT_1": "2g",
        }
    )
    result = container.run("probe", "meminfo", "device", "1", "meminfo", "alloc", "1500m")
    device0, device1 = result.of("meminfo")
    assert device0.int("total") == 1 << 30
    assert device1.int("total") == 2 << 30
    assert result.of("alloc")[0].int("rc") == CUDA_SUCCESS


def test_the_mock_enforces_the_physical_total_when_there_is_no_slice(
    container: harness.Container,
) -> None:
    container.env["VSLICE_MOCKGPU_DEVICES"] = "GPU-small:1024"
    result = container.run("probe", "alloc", "2g", "alloc", "1000m", "meminfo")
    too_big, fits = result.of("alloc")
    assert too_big.int("rc") == CUDA_ERROR_OUT_OF_MEMORY
    assert fits.int("rc") == CUDA_SUCCESS
    assert result.of("meminfo")[0].int("total") == 1024 * MIB


@pytest.mark.parametrize("command", ["alloc", "vmm", "pool"])
def test_allocated_memory_can_be_written(container: harness.Container, command: str) -> None:
    container.env["CUDA_DEVICE_MEMORY_LIMIT"] = "1g"
    result = container.run("probe", command, "64m", "write", "0")
    assert result.of("write")[0].int("ok") == 1
