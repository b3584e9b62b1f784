"""Escapes no interposer can stop, caught by the node agent's host-side check.

A program can reach the driver past libvgpu: by reading libcuda's symbol table itself,
by loading the driver with ``dlmopen`` into a new namespace (preloads are not loaded
there), as a static binary, or started without ``LD_PRELOAD`` in an image without
``/etc/ld.so.preload``. Each runs here on the mock GPU in a slice the agent prepared
(``Slicer``); the mock NVML then shows its memory, and the agent's check
(``Slicer.usage`` and ``loops.enforce``, what its usage step runs) must report it as an
escape and kill it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from libshared import events
from libshared.ledgers import PodCharge, Slice
from services.nodeagent.adapters import hostroots, loops
from services.nodeagent.adapters.slicing import Slicer
from services.nodeagent.core import allocating, preparing, usages
from tests.libvgpu import harness

MIB = 1 << 20
GPU = "GPU-e5ca9e00-0000-4000-8000-000000000001"
SLICE_MIB = 256


def placement(uid: str) -> events.Placement:
    s = Slice(
        pod_uid=uid,
        namespace="ns",
        pod=uid,
        container="main",
        container_index=0,
        uuid=GPU,
        device_index=0,
        memory_mib=SLICE_MIB,
        cores_percent=0,
    )
    return events.Placement(
        pod_uid=uid, namespace="ns", pod=uid, node="n1", slices=(s,), charge=PodCharge(pod_uid=uid)
    )


def slicer_on_mock(tmp_path: Path) -> Slicer:
    mock = preparing.MockDriver(
        library_dir=str(harness.MOCK_DIR),
        state=str(tmp_path / "mockgpu.state"),
        devices=f"{GPU}:2048",
    )
    layout = preparing.Layout(root=str(tmp_path / "host"), libvgpu=str(harness.LIBVGPU), mock=mock)
    return Slicer(node="n1", layout=layout)


def nvml_readings(
    slicer: Slicer,
) -> tuple[list[usages.DeviceReading], list[usages.ProcessReading]]:
    """What the agent's NVML backend reads on the mock card (in a fresh process: the
    mock NVML attaches to one card per process)."""
    mock = slicer.layout.mock
    assert mock is not None
    out = subprocess.run(
        [sys.executable, "-m", "tests.nodeagent.nvmlcheck", "read"],
        cwd=harness.ROOT,
        env={
            "LD_LIBRARY_PATH": mock.library_dir,
            "VSLICE_MOCKGPU_STATE": mock.state,
            "VSLICE_MOCKGPU_DEVICES": mock.devices,
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    read = json.loads(out.stdout)
    return (
        [usages.DeviceReading(**d) for d in read["devices"]],
        [usages.ProcessReading(**p) for p in read["processes"]],
    )


@pytest.mark.parametrize(
    ("program", "mode", "preload"),
    [
        pytest.param("escape", "symtab", True, id="symbol-table-read-from-libcuda's-file"),
        pytest.param("escape", "dlmopen", True, id="driver-loaded-into-a-new-namespace"),
        pytest.param("escape-static", "linked", True, id="static-binary"),
        pytest.param("escape", "linked", False, id="no-LD_PRELOAD-and-no-ld.so.preload"),
    ],
)
def test_the_host_side_check_catches_and_kills_what_no_interposer_can_stop(
    native: None, tmp_path: Path, program: str, mode: str, preload: bool
) -> None:
    slicer = slicer_on_mock(tmp_path)
    ready = slicer.prepare(placement("p1"))
    assert isinstance(ready, events.Ready)
    env = dict(ready.env["main"])
    if not preload:
        del env["LD_PRELOAD"]
    proc = subprocess.Popen(
        [str(harness.BUILD / program), mode, f"{2 * SLICE_MIB}m"],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        (line,) = harness.parse(proc.stdout.readline())
        assert line.int("rc") == harness.CUDA_SUCCESS  # past the slice: libvgpu never saw it
        devices, processes = nvml_readings(slicer)
        usage = loops.enforce(slicer.usage(devices, processes, margin_bytes=0), kill=True)
        assert [
            (e.pid, e.uuid, e.used_bytes, e.limit_bytes, e.pod_uid, e.killed) for e in usage.escapes
        ] == [(proc.pid, GPU, 2 * SLICE_MIB * MIB, SLICE_MIB * MIB, "p1", True)]
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def test_a_process_held_to_its_slice_is_no_escape(native: None, tmp_path: Path) -> None:
    slicer = slicer_on_mock(tmp_path)
    ready = slicer.prepare(placement("p1"))
    assert isinstance(ready, events.Ready)
    proc = subprocess.Popen(
        [str(harness.BUILD / "escape"), "linked", f"{SLICE_MIB // 2}m"],
        env=ready.env["main"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        (line,) = harness.parse(proc.stdout.readline())
        assert line.int("rc") == harness.CUDA_SUCCESS
        devices, processes = nvml_readings(slicer)
        assert [p.pid for p in processes] == [proc.pid]
        usage = slicer.usage(devices, processes, margin_bytes=0)
        assert usage.escapes == ()
        assert [(c.used_bytes, c.pids) for c in usage.containers] == [
            (SLICE_MIB // 2 * MIB, (proc.pid,))
        ]
    finally:
        proc.communicate(input="\n", timeout=30)


# A pod's processes see their slice at the paths Allocate mounts, in their own mount and
# PID namespaces: `unshare -m -p -f` (root) with the same bind mounts stands in for the
# runtime. The program is pid 1 there; NVML (the mock, as a real driver) names its host pid.
POD_SHELL = """
mount --make-rprivate / && mount -t tmpfs vslice-pod /usr/local || exit 97
while [ "$1" != -- ]; do
    target=$1; source=$2; shift 2
    if [ -d "$source" ]; then mkdir -p "$target"; else mkdir -p "${target%/*}"; : > "$target"; fi
    mount --bind "$source" "$target" || exit 98
done
shift
exec env ${POD_PRELOAD:+LD_PRELOAD=$POD_PRELOAD} "$@"
"""


def start_in_pod(
    response: allocating.ContainerResponse,
    argv: list[str],
    *,
    preload: bool,
    own_proc: bool = False,
) -> subprocess.Popen[str]:
    """``argv`` as pid 1 of a pod; ``own_proc`` mounts the pod's own /proc, as runtimes
    do (then the mock NVML cannot learn the host pid a real driver would report)."""
    binds = [p for m in response.mounts for p in (m.container_path, m.host_path)]
    env = dict(response.envs)
    if preload:  # the image's /etc/ld.so.preload would name it; the host's /etc stays as is
        env["POD_PRELOAD"] = allocating.CONTAINER_LIBVGPU
    return subprocess.Popen(
        [
            "unshare",
            "-m",
            "-p",
            "-f",
            *(["--mount-proc"] if own_proc else []),
            "sh",
            "-c",
            POD_SHELL,
            "sh",
            *binds,
            "--",
            *argv,
        ],
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **env},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="mount namespaces need root")
@pytest.mark.parametrize(
    ("size_mib", "preload", "escaped"),
    [
        pytest.param(2 * SLICE_MIB, False, True, id="an-escape-is-its-pod's-and-is-killed"),
        pytest.param(SLICE_MIB // 2, True, False, id="a-process-within-its-slice-is-counted"),
    ],
)
def test_in_a_pod_a_process_belongs_to_the_pod_whose_cache_it_sees_at_the_container_path(
    native: None, tmp_path: Path, size_mib: int, preload: bool, escaped: bool
) -> None:
    slicer = slicer_on_mock(tmp_path)
    nvml_readings(slicer)  # the agent's NVML creates the mock card's state file
    for uid in ("p1", "p2"):  # both see their cache at the same container path
        assert isinstance(slicer.prepare(placement(uid)), events.Ready)
    (plan,) = preparing.plan(placement("p2"), slicer.layout)
    response = allocating.container_response(
        plan,
        layout=slicer.layout,
        libvgpu=str(harness.LIBVGPU),
        preload=os.devnull,
        disable_control=True,
    )
    assert response.envs["CUDA_DEVICE_MEMORY_SHARED_CACHE"].startswith(
        allocating.CONTAINER_CACHE_DIR
    )
    proc = start_in_pod(
        response, [str(harness.BUILD / "escape"), "linked", f"{size_mib}m"], preload=preload
    )
    try:
        assert proc.stdout is not None
        raw = proc.stdout.readline()
        assert raw, proc.stderr.read() if proc.stderr else ""
        (line,) = harness.parse(raw)
        assert line.int("rc") == harness.CUDA_SUCCESS
        assert line.int("pid") == 1
        devices, processes = nvml_readings(slicer)
        (host_pid,) = [p.pid for p in processes]
        assert hostroots.parent_of(host_pid) == proc.pid  # unshare forked it
        usage = loops.enforce(slicer.usage(devices, processes, margin_bytes=0), kill=True)
        if escaped:
            assert [(e.pid, e.used_bytes, e.pod_uid, e.killed) for e in usage.escapes] == [
                (host_pid, size_mib * MIB, "p2", True)
            ]
            proc.wait(timeout=30)
            assert not harness.pid_alive(host_pid)
        else:
            assert usage.escapes == ()
            rows = {c.pod_uid: (c.used_bytes, c.pids) for c in usage.containers}
            assert rows == {"p1": (0, ()), "p2": (size_mib * MIB, (host_pid,))}
    finally:
        if proc.poll() is None:
            proc.communicate(input="\n", timeout=30)
        else:
            proc.communicate(timeout=30)


@pytest.mark.skipif(os.geteuid() != 0, reason="mount namespaces need root")
def test_a_released_pod_is_swept_once_its_killed_process_is_gone_whatever_its_pid_was_there(
    native: None, tmp_path: Path
) -> None:
    slicer = slicer_on_mock(tmp_path)
    nvml_readings(slicer)
    assert isinstance(slicer.prepare(placement("p1")), events.Ready)
    (plan,) = preparing.plan(placement("p1"), slicer.layout)
    response = allocating.container_response(
        plan,
        layout=slicer.layout,
        libvgpu=str(harness.LIBVGPU),
        preload=os.devnull,
        disable_control=True,
    )
    probe = [str(harness.BUILD / "probe"), "alloc", "32m", "ready", "wait"]
    proc = start_in_pod(response, probe, preload=True, own_proc=True)
    try:
        assert proc.stdout is not None
        lines = [harness.parse(proc.stdout.readline())[0] for _ in range(2)]
        assert [(line.command, line.values.get("pid")) for line in lines] == [
            ("alloc", None),
            ("ready", "1"),
        ]
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        os.kill(int(children[0]), signal.SIGKILL)  # no exit handler frees its slot
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)
    cache = hostroots.read_cache(slicer.root, "p1_main")
    assert not isinstance(cache, str)
    assert [p.pid for p in cache.processes] == [1]  # the pid it had in its pod
    assert slicer.release("p1", now=0.0) == ["p1_main"]
    assert slicer.sweep(now=1000.0) == ["p1_main"]
