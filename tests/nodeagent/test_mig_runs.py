"""Dynamic MIG end to end: ``vslice up`` with a node config putting its one mock A100 in
``mig`` mode, then ``vslice run --gpumem 9000``: the run gets a GPU instance of the
smallest allowed profile holding 9,000 MiB (``1g.10gb``) created through the mock NVML,
sees only that instance, shows in ``vslice status`` and ``/metrics`` while it runs, and
the instance is destroyed after the run."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.libvgpu import harness
from tests.metrics import promtext
from tests.nodeagent.modestacks import mode_stack

MIB = 1 << 20
GPU = "GPU-a1000000-0000-4000-8000-0000000000a1"
PROBE = [sys.executable, str(Path(__file__).parent / "programs" / "cudaprobe.py")]
MOCK_DIR = harness.ROOT / "services" / "nodeagent" / "mockgpu"
LIST_INSTANCES = """
import ctypes, json, sys
import pynvml
pynvml.nvmlLib = ctypes.CDLL(sys.argv[1])
pynvml._nvmlGetFunctionPointer_cache.clear()
pynvml.nvmlInit()
from services.nodeagent.adapters.migdevices import NvmlMig
print(json.dumps([r.__dict__ for r in NvmlMig().instances(sys.argv[2])]))
"""


@dataclass(frozen=True)
class MigUp:
    state: Path
    env: dict[str, str]
    metrics_url: str

    def cli(
        self, command: str, *args: str, timeout_s: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "vslice.cli", command, "--state-dir", str(self.state), *args],
            cwd=harness.ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )

    def instances(self) -> list[dict[str, object]]:
        """The GPU instances the mock card holds now, through its NVML."""
        done = subprocess.run(
            [sys.executable, "-c", LIST_INSTANCES, str(MOCK_DIR / "libnvidia-ml.so.1"), GPU],
            cwd=harness.ROOT,
            env={
                **self.env,
                "VSLICE_MOCKGPU_STATE": str(self.state / "host" / "mockgpu.state"),
            },
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        listed: list[dict[str, object]] = json.loads(done.stdout)
        return listed


@pytest.fixture(scope="module")
def mig_up(native: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MigUp]:
    state = tmp_path_factory.mktemp("migstack")
    devices = f"{GPU}:40960:NVIDIA A100-SXM4-40GB:mig"
    settings = {"VSLICE_USAGE_INTERVAL_S": "0.3", "VSLICE_GRACE_S": "0.5"}
    with mode_stack(state, "mig", devices, **settings) as recorded:
        yield MigUp(state=state, env=recorded["env"], metrics_url=recorded["metrics_url"])


def wait_for(check: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        time.sleep(0.1)


def test_a_run_gets_the_smallest_mig_instance_holding_its_memory_and_it_is_destroyed_after(
    mig_up: MigUp, tmp_path: Path
) -> None:
    assert mig_up.instances() == []
    go = tmp_path / "go"
    run = subprocess.Popen(
        [
            *(sys.executable, "-m", "vslice.cli", "run", "--state-dir", str(mig_up.state)),
            *("--gpumem", "9000", "--"),
            *(
                "sh",
                "-c",
                'echo "visible=$CUDA_VISIBLE_DEVICES preload=${LD_PRELOAD:-none}"; exec "$@"',
            ),
            *("probe", *PROBE, "hold", "8192", "120", str(go)),
        ],
        cwd=harness.ROOT,
        env=mig_up.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert run.stdout is not None
        first = run.stdout.readline()
        assert first.startswith("visible=MIG-"), first + (run.stderr.read() if run.stderr else "")
        assert "preload=none" in first
        assert run.stdout.readline().startswith("held 8192 MiB")
        meminfo = dict(w.split("=") for w in run.stdout.readline().split()[1:])
        assert int(meminfo["total"]) == 10 * 1024 * MIB  # 1g.10gb, not the whole card
        (made,) = mig_up.instances()
        assert (made["profile"], made["size"]) == ("1g.10gb", 2)
        assert made["start"] in (0, 2, 4, 6)  # where the scheduler's placement put it
        assert first.split()[0] == f"visible={made['mig_uuid']}"

        status = mig_up.cli("status")
        assert status.returncode == 0, status.stderr
        assert f"MIG 1g.10gb@{made['start']}" in status.stdout

        def scraped() -> list[float]:
            with urllib.request.urlopen(mig_up.metrics_url + "/metrics", timeout=5) as r:
                text = r.read().decode()
            return promtext.labelled(
                "hami_node_gpu_mig_instance_info",
                text,
                device_uuid=GPU,
                mig_uuid=str(made["mig_uuid"]),
                profile="1g.10gb",
                placement_start=str(made["start"]),
                placement_size="2",
            )

        wait_for(lambda: scraped() == [1], "the instance in /metrics")
    finally:
        go.touch()
        out, err = run.communicate(timeout=60)
    assert run.returncode == 0, out + err
    wait_for(lambda: mig_up.instances() == [], "the instance destroyed after the run")


def test_a_run_asking_more_than_the_largest_profile_is_refused_and_creates_nothing(
    mig_up: MigUp,
) -> None:
    done = mig_up.cli("run", "--gpumem", "50000", "--", "true")
    assert done.returncode != 0
    assert "CardInsufficientMemory" in done.stderr + done.stdout
    assert mig_up.instances() == []
