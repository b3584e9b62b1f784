"""Operating mode ``mps``: a slice's container is a client of the node's MPS server, held
to its slice by ``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT`` and ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``
(no libvgpu); the mock driver applies those variables as the MPS server does; ``vslice up``
with an mps node config runs ``vslice run`` as an MPS client that stops at its slice."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from libshared import events
from libshared.ledgers import PodCharge, Slice
from services.nodeagent.adapters.mpsservers import MpsServer
from services.nodeagent.core import allocating, preparing
from tests.libvgpu import harness
from tests.nodeagent.modestacks import mode_stack

PROBE = [sys.executable, str(Path(__file__).parent / "programs" / "cudaprobe.py")]
GPU = "GPU-5e5e0000-0000-4000-8000-00000000a2a2"


def slice_of(uuid: str, index: int, memory_mib: int, cores: int) -> Slice:
    return Slice(
        pod_uid="uid-p1",
        namespace="default",
        pod="p1",
        container="main",
        container_index=0,
        uuid=uuid,
        device_index=index,
        memory_mib=memory_mib,
        cores_percent=cores,
    )


def placement(*slices: Slice) -> events.Placement:
    return events.Placement(
        pod_uid="uid-p1",
        namespace="default",
        pod="p1",
        node="n1",
        slices=slices,
        charge=PodCharge(pod_uid="uid-p1"),
    )


def test_an_mps_client_is_given_its_limits_as_mps_variables_and_no_libvgpu(
    tmp_path: Path,
) -> None:
    layout = preparing.Layout(root=str(tmp_path), libvgpu="/lib/libvgpu.so")
    mps = preparing.Mps.under(str(tmp_path))
    (plan,) = preparing.plan(
        placement(slice_of("GPU-a", 0, 3000, 30), slice_of("GPU-b", 1, 5000, 30)),
        layout,
        mps=mps,
    )
    assert plan.env["CUDA_VISIBLE_DEVICES"] == "GPU-a,GPU-b"
    assert plan.env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=3000M,1=5000M"
    assert plan.env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "30"
    assert plan.env["CUDA_MPS_PIPE_DIRECTORY"] == f"{tmp_path}/mps/pipe"
    assert "LD_PRELOAD" not in plan.env
    assert plan.libvgpu is False
    assert not any(k.startswith("CUDA_DEVICE_MEMORY_LIMIT") for k in plan.env)
    (no_cores,) = preparing.plan(placement(slice_of("GPU-a", 0, 3000, 0)), layout, mps=mps)
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in no_cores.env
    out = allocating.container_response(
        plan, layout=layout, libvgpu="/lib/v.so", preload="/p", disable_control=False
    )
    mounted = {m.container_path: m for m in out.mounts}
    assert allocating.LD_SO_PRELOAD not in mounted
    assert allocating.CONTAINER_LIBVGPU not in mounted
    assert mounted[mps.pipe_dir].host_path == mps.pipe_dir
    assert not mounted[mps.pipe_dir].read_only


def test_without_its_program_the_mps_daemon_is_not_started_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = MpsServer(preparing.Mps.under(str(tmp_path)), binary="no-such-mps-control")
    assert server.start() is False
    assert (tmp_path / "mps" / "pipe").is_dir()
    assert any(r.getMessage() == "MPS control daemon not found" for r in caplog.records)
    server.stop()  # nothing started: nothing to stop


def test_the_mps_daemon_is_started_with_its_directories_and_told_to_quit(tmp_path: Path) -> None:
    seen = tmp_path / "calls"
    fake = tmp_path / "bin" / "fake-mps-control"
    fake.parent.mkdir()
    fake.write_text(
        "#!/bin/sh\n"
        f'echo "$* pipe=$CUDA_MPS_PIPE_DIRECTORY log=$CUDA_MPS_LOG_DIRECTORY" >> {seen}\n'
        f"cat >> {seen}\n"
    )
    fake.chmod(0o755)
    mps = preparing.Mps.under(str(tmp_path))
    server = MpsServer(mps, binary=str(fake))
    assert server.start() is True
    server.stop()
    lines = seen.read_text().splitlines()
    assert lines[0] == f"-d pipe={mps.pipe_dir} log={mps.log_dir}"
    assert lines[1] == f" pipe={mps.pipe_dir} log={mps.log_dir}"
    assert lines[2] == "quit"


def probe(tmp_path: Path, extra: dict[str, str], *args: str) -> str:
    env = {
        **os.environ,
        "LD_LIBRARY_PATH": str(harness.MOCK_DIR),
        "VSLICE_MOCKGPU_STATE": str(tmp_path / "mock.state"),
        "VSLICE_MOCKGPU_DEVICES": f"{GPU}:4096",
        **extra,
    }
    done = subprocess.run(
        [*PROBE, *args], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout


@pytest.mark.parametrize(
    ("limit", "filled"),
    [("0=512M", 512), ("0=1G", 1024), ("", 4096), ("1=512M", 4096), ("0=junk", 4096)],
)
def test_the_mock_driver_holds_a_process_to_its_pinned_mps_limit(
    native: None, tmp_path: Path, limit: str, filled: int
) -> None:
    out = probe(tmp_path, {"CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": limit}, "fill", "64")
    assert f"filled {filled} MiB" in out


@pytest.fixture(scope="module")
def mps_up(native: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    state = tmp_path_factory.mktemp("mpsstack")
    with mode_stack(state, "mps", f"{GPU}:4096", VSLICE_GRACE_S="0.5"):
        yield state


def test_vslice_run_on_an_mps_node_is_an_mps_client_held_to_its_slice(mps_up: Path) -> None:
    done = subprocess.run(
        [
            *(sys.executable, "-m", "vslice.cli", "run", "--state-dir", str(mps_up)),
            *("--gpumem", "512", "--gpucores", "25", "--"),
            *(
                "sh",
                "-c",
                'echo "pinned=$CUDA_MPS_PINNED_DEVICE_MEM_LIMIT'
                ' threads=$CUDA_MPS_ACTIVE_THREAD_PERCENTAGE preload=${LD_PRELOAD:-none}";'
                ' exec "$@"',
            ),
            *("probe", *PROBE, "fill", "64"),
        ],
        cwd=harness.ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "pinned=0=512M threads=25 preload=none" in done.stdout
    assert "cuMemAlloc(64 MiB) after 512 MiB: CUDA_ERROR_OUT_OF_MEMORY" in done.stdout
