"""Programs get the capped functions however they look them up."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.libvgpu import harness
from tests.libvgpu.harness import CUDA_ERROR_OUT_OF_MEMORY, CUDA_SUCCESS, MIB

PER_THREAD = "2"  # CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM
LEGACY = "1"  # CU_GET_PROC_ADDRESS_LEGACY_STREAM


@pytest.mark.parametrize(
    ("program", "flags"),
    [
        pytest.param("probe", [], id="linked-with-libcuda"),
        pytest.param("probe_dl", ["--via=dlsym"], id="dlopen-then-dlsym"),
        pytest.param("probe_dl", ["--via=procaddr"], id="runtime-style-cuGetProcAddress_v2"),
        pytest.param("probe_dl", ["--via=procaddr", "--ptds"], id="per-thread-stream-lookups"),
    ],
)
def test_the_cap_holds_however_the_program_finds_the_driver(
    container: harness.Container, program: str, flags: list[str]
) -> None:
    container.env["CUDA_DEVICE_MEMORY_LIMIT"] = "100m"
    result = container.run(
        program, *flags, "alloc", "60m", "alloc", "60m", "async", "60m", "meminfo", "nvml"
    )
    assert [a.int("rc") for a in result.of("alloc")] == [CUDA_SUCCESS, CUDA_ERROR_OUT_OF_MEMORY]
    assert result.of("async")[0].int("rc") == CUDA_ERROR_OUT_OF_MEMORY
    assert result.of("meminfo")[0].int("total") == 100 * MIB
    assert result.of("nvml")[0].int("used") == 60 * MIB


@pytest.mark.parametrize(
    "mode",
    [
        pytest.param("next", id="dlsym-RTLD_NEXT-from-a-library-loaded-after-libvgpu"),
        pytest.param("default", id="dlsym-RTLD_DEFAULT"),
        pytest.param("handle", id="dlsym-on-a-libcuda-handle"),
        pytest.param("copy", id="dlopen-of-a-renamed-copy-of-libcuda-and-nvml"),
        pytest.param("vcopy", id="dlvsym-on-a-driver-with-versioned-symbols"),
        pytest.param("dependent", id="dlsym-on-a-library-that-depends-on-libcuda"),
    ],
)
def test_every_lookup_an_interposer_sees_finds_the_capped_functions(
    container: harness.Container, mode: str
) -> None:
    container.env["CUDA_DEVICE_MEMORY_LIMIT"] = "100m"
    copies = [container.root / "libgpu-driver.so", container.root / "libgpu-ml.so"]
    shutil.copy(harness.MOCK_DIR / "libnvidia-ml.so.1", copies[1])
    if mode == "vcopy":
        copies[0] = harness.BUILD / "libcuda-versioned.so"
    else:
        shutil.copy(harness.MOCK_DIR / "libcuda.so.1", copies[0])
    result = container.run("lookups", mode, *map(str, copies))
    found = {line.values["name"]: line.values["library"] for line in result.of("lookup")}
    assert found == dict.fromkeys(
        [
            "cuMemAlloc_v2",
            "cuMemGetInfo_v2",
            "cuLaunchKernel",
            "cuGetProcAddress_v2",
            "nvmlDeviceGetMemoryInfo",
        ],
        "libvgpu.so",
    )
    assert [a.int("rc") for a in result.of("alloc")] == [CUDA_SUCCESS, CUDA_ERROR_OUT_OF_MEMORY]


# (name, cudaVersion, flags) -> (CUresult, status, symbol, library)
LOOKUPS = [
    (("cuMemAlloc", "12000", "0"), (0, 0, "cuMemAlloc_v2", "libvgpu.so")),
    (("cuMemAlloc", "3000", "0"), (0, 0, "cuMemAlloc", "libvgpu.so")),
    (("cuMemFree", "12000", "0"), (0, 0, "cuMemFree_v2", "libvgpu.so")),
    (("cuMemGetInfo", "12000", "0"), (0, 0, "cuMemGetInfo_v2", "libvgpu.so")),
    (("cuMemAllocPitch", "12000", "0"), (0, 0, "cuMemAllocPitch_v2", "libvgpu.so")),
    (("cuMemCreate", "12000", "0"), (0, 0, "cuMemCreate", "libvgpu.so")),
    (("cuLaunchKernel", "12000", LEGACY), (0, 0, "cuLaunchKernel", "libvgpu.so")),
    (("cuLaunchKernel", "12000", PER_THREAD), (0, 0, "cuLaunchKernel_ptsz", "libvgpu.so")),
    (("cuLaunchKernelEx", "12000", PER_THREAD), (0, 0, "cuLaunchKernelEx_ptsz", "libvgpu.so")),
    (("cuGraphLaunch", "12000", PER_THREAD), (0, 0, "cuGraphLaunch_ptsz", "libvgpu.so")),
    (
        ("cuLaunchCooperativeKernel", "12000", PER_THREAD),
        (0, 0, "cuLaunchCooperativeKernel_ptsz", "libvgpu.so"),
    ),
    (("cuMemAllocAsync", "12000", PER_THREAD), (0, 0, "cuMemAllocAsync_ptsz", "libvgpu.so")),
    (
        ("cuMemAllocFromPoolAsync", "12000", "0"),
        (0, 0, "cuMemAllocFromPoolAsync", "libvgpu.so"),
    ),
    (("cuMemFreeAsync", "12000", PER_THREAD), (0, 0, "cuMemFreeAsync_ptsz", "libvgpu.so")),
    (("cuMemcpyHtoD", "12000", PER_THREAD), (0, 0, "cuMemcpyHtoD_v2_ptds", "libcuda.so.1")),
    (("cuCtxSynchronize", "12000", "0"), (0, 0, "cuCtxSynchronize", "libcuda.so.1")),
    (("cuGetProcAddress", "12050", "0"), (0, 0, "cuGetProcAddress_v2", "libvgpu.so")),
    (("cuGetProcAddress", "12000", "0"), (0, 0, "cuGetProcAddress", "libvgpu.so")),
    (("cuMemAllocAsync", "11000", "0"), (500, 2, "-", "-")),
    (("cuNoSuchFunction", "12000", "0"), (500, 1, "-", "-")),
]


@pytest.mark.parametrize(("query", "answer"), LOOKUPS, ids=lambda v: "-".join(map(str, v)))
def test_cuGetProcAddress_answers_by_name_version_and_stream_flags(
    container: harness.Container,
    query: tuple[str, str, str],
    answer: tuple[int, int, str, str],
) -> None:
    result = container.run("probe_dl", "--via=procaddr", "procaddr", *query)
    line = result.of("procaddr")[0]
    got = (line.int("rc"), line.int("status"), line.values["symbol"], line.values["library"])
    assert got == answer


def test_cuGetProcAddress_v1_hands_out_wrappers_too(container: harness.Container) -> None:
    line = container.run("probe", "procaddr1", "cuMemAlloc", "12000", "0").of("procaddr1")[0]
    assert (line.values["symbol"], line.values["library"]) == ("cuMemAlloc_v2", "libvgpu.so")


def test_rtld_next_lookups_of_other_libraries_keep_working(native: None) -> None:
    preload = f"{harness.LIBVGPU} {harness.BUILD / 'libnextshim.so'}"
    proc = subprocess.run(
        [str(harness.BUILD / "rtldnext")],
        env={"LD_PRELOAD": preload},
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    line = harness.parse(proc.stdout)[0]
    assert line.int("ok") == 1
    assert line.int("shim_calls") == 1
    assert line.values["next_from_main"].endswith("libnextshim.so")


def test_libvgpu_uses_no_glibc_private_symbol(native: None) -> None:
    undefined = harness.nm_undefined(harness.LIBVGPU)
    assert not [s for s in undefined if s.split("@")[0].startswith("_dl")]


def test_libvgpu_needs_no_glibc_newer_than_2_17_so_it_loads_on_ubi8_and_ubuntu_20_04(
    native: None,
) -> None:
    # /etc/ld.so.preload only warns when a library does not load, so a version too new
    # for the image (UBI 8: 2.28, Ubuntu 20.04: 2.31) would leave the container unsliced
    required = harness.glibc_versions(harness.LIBVGPU)
    assert required, "objdump -T shows the glibc versions libvgpu.so needs"
    too_new = sorted(v for v in required if v > (2, 17))
    assert not too_new, [f"GLIBC_{'.'.join(map(str, v))}" for v in too_new]
    # glibc < 2.34 keeps dlopen/dlsym in libdl and pthread_once in libpthread
    assert {"libdl.so.2", "libpthread.so.0"} <= set(harness.needed(harness.LIBVGPU))


def test_the_image_ships_libvgpu_built_and_floor_checked_by_its_makefile() -> None:
    # the DaemonSet and compose run the image compose/Dockerfile builds
    dockerfile = (harness.ROOT / "compose" / "Dockerfile").read_text()
    assert "make -C libvgpu libvgpu.so glibc-floor" in dockerfile
    assert "COPY --from=native /src/libvgpu/libvgpu.so" in dockerfile


def test_a_program_that_never_calls_cuda_is_untouched(container: harness.Container) -> None:
    proc = subprocess.run(
        ["/bin/echo", "hello"],
        env=container.environment({"CUDA_DEVICE_MEMORY_LIMIT": "1g"}),
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    assert proc.stdout == "hello\n"
    assert proc.stderr == ""
    assert not container.cache.exists()


def test_logs_go_to_stderr_at_the_level_asked_for(container: harness.Container) -> None:
    container.env["CUDA_DEVICE_MEMORY_LIMIT"] = "10m"
    quiet = container.run("probe", "alloc", "20m", env={"LIBCUDA_LOG_LEVEL": "0"})
    chatty = container.run("probe", "alloc", "20m", env={"LIBCUDA_LOG_LEVEL": "2"})
    assert quiet.stderr == ""
    assert "cuMemAlloc_v2: 20971520 bytes refused on device 0" in chatty.stderr
    assert chatty.of("alloc")[0].int("rc") == CUDA_ERROR_OUT_OF_MEMORY
