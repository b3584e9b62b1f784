"""``vslice up --mock-dcus`` runs a mixed node (a mock GPU and two mock Hygon DCUs), and
``vslice run --dcus`` runs a program in a DCU slice of it, end to end: admission, the
scheduler replicas fitting the request to the DCUs only, the node agent's answer.
The program sees its DCU in ``HIP_VISIBLE_DEVICES`` and no libvgpu; a GPU run on the
same node still gets its GPU and libvgpu."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.libvgpu import harness

GPU = "GPU-0a1b2c3d-0000-4000-8000-00000000d00d"
D0 = "DCU-0a1b2c3d-0000-4000-8000-0000000000d0"
D1 = "DCU-0a1b2c3d-0000-4000-8000-0000000000d1"
CLI = [sys.executable, "-m", "vslice.cli"]
SHOW = (
    "import json, os; print(json.dumps({k: os.environ.get(k) for k in"
    " ('HIP_VISIBLE_DEVICES', 'CUDA_VISIBLE_DEVICES', 'LD_PRELOAD')}))"
)


@pytest.fixture(scope="module")
def state(native: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    state = tmp_path_factory.mktemp("dcu-stack")
    env = {**os.environ, "VSLICE_MOCKGPU_DEVICES": f"{GPU}:4096", "VSLICE_GPU_BACKEND": "mock"}
    env.pop("VSLICE_MOCKDCU_DEVICES", None)  # the flag gives the DCUs

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CLI, *args, "--state-dir", str(state)],
            cwd=harness.ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )

    started = cli("up", "--mock-dcus", f"{D0}:16384:Z100,{D1}:16384:Z100")
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield state
    finally:
        cli("down")


def run(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    return subprocess.run(
        [*CLI, "run", "--state-dir", str(state), *args],
        cwd=harness.ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def test_a_dcu_run_sees_its_dcu_by_index_and_no_libvgpu(state: Path) -> None:
    done = run(state, "--dcus", "1", "--gpumem", "8192", "--", sys.executable, "-c", SHOW)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["HIP_VISIBLE_DEVICES"] in ("0", "1")
    assert seen["CUDA_VISIBLE_DEVICES"] is None and seen["LD_PRELOAD"] is None
    assert "8,192 MiB" in done.stderr and ("DCU-0a1b" in done.stderr)


def test_a_gpu_run_on_the_mixed_node_still_gets_its_gpu_and_libvgpu(state: Path) -> None:
    done = run(state, "--gpumem", "1024", "--", sys.executable, "-c", SHOW)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["CUDA_VISIBLE_DEVICES"] == GPU
    assert seen["HIP_VISIBLE_DEVICES"] is None
    assert seen["LD_PRELOAD"] and "libvgpu" in seen["LD_PRELOAD"]


def test_a_dcu_request_larger_than_any_dcu_is_refused_naming_dcus(state: Path) -> None:
    done = run(state, "--dcus", "1", "--gpumem", "20000", "--", "true")
    assert done.returncode == 3, done.stderr
    assert "20,000 MiB" in done.stderr and "on 1 DCU" in done.stderr
    assert GPU not in done.stderr  # the GPU is not a DCU: never offered as free


def test_a_node_of_dcus_only_runs_a_dcu_slice(native: None, tmp_path: Path) -> None:
    env = {**os.environ, "VSLICE_GPU_BACKEND": "mock"}
    for var in ("VSLICE_MOCKDCU_DEVICES", "VSLICE_MOCKGPU_DEVICES", "VSLICE_MOCKGPU_COUNT"):
        env.pop(var, None)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CLI, *args, "--state-dir", str(tmp_path)],
            cwd=harness.ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )

    started = cli("up", "--mock-gpus", "0", "--mock-dcus", f"{D0}:16384:Z100")
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        status = cli("status", "--nodes")
        assert status.returncode == 0, status.stderr
        assert "devices by vendor: DCU 1" in status.stdout
        assert "GPU-" not in status.stdout  # no mock GPU made up
        done = run(tmp_path, "--dcus", "1", "--gpumem", "2000", "--", sys.executable, "-c", SHOW)
        assert done.returncode == 0, done.stderr
        seen = json.loads(done.stdout.strip().splitlines()[-1])
        assert seen == {
            "HIP_VISIBLE_DEVICES": "0",
            "CUDA_VISIBLE_DEVICES": None,
            "LD_PRELOAD": None,
        }
        gpu = run(tmp_path, "--gpumem", "1000", "--", "true")
        assert gpu.returncode == 3, gpu.stderr  # a GPU asked of a node without one
    finally:
        cli("down")
