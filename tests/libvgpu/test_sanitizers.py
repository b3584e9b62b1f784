"""The allocation, lookup and launch paths run clean under ASan and UBSan."""

from __future__ import annotations

import shlex
import subprocess

import pytest

from tests.libvgpu import harness
from tests.libvgpu.harness import CUDA_ERROR_OUT_OF_MEMORY, CUDA_SUCCESS


@pytest.fixture
def sanitized(container: harness.Container) -> harness.Container:
    runtime = subprocess.run(
        ["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True, check=True
    ).stdout.strip()
    container.preload = None
    container.env.update(
        {
            "LD_PRELOAD": f"{runtime} {harness.LIBVGPU_ASAN}",
            "ASAN_OPTIONS": "detect_leaks=0:exitcode=23",
            "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
            "CUDA_DEVICE_MEMORY_LIMIT": "100m",
            "CUDA_DEVICE_SM_LIMIT": "50",
        }
    )
    return container


@pytest.mark.parametrize("program", ["probe", "probe_dl"])
def test_every_path_runs_clean_under_the_sanitizers(
    sanitized: harness.Container, program: str
) -> None:
    script = shlex.split(
        "alloc 60m alloc 60m pitch 1000 100 vmm 4m async 1m pool 1m managed 1m alloc1 1m "
        "pitch1 100 10 raw 1m free 0 free 1 free 2 free 3 free 4 free 5 free 6 free 7 free 8 "
        "free 8 array 1000 10 mipmap 100 100 2 array3d 10 10 10 free 9 free 10 free 11 sync "
        "meminfo meminfo1 nvml nvml2 launch kernel 100 20 launch ex 100 20 "
        "launch coop 100 20 launch graph 100 20 procaddr cuMemAlloc 12000 2 fill 1m"
    )
    result = sanitized.run(program, *script)
    assert [a.int("rc") for a in result.of("alloc")] == [CUDA_SUCCESS, CUDA_ERROR_OUT_OF_MEMORY]
    assert result.of("fill")[0].int("count") == 100
    assert "runtime error" not in result.stderr
    assert "AddressSanitizer" not in result.stderr
