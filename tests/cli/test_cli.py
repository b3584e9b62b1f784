"""The command line for people: bad input refused before any work with a message naming the
flag, the value and the rule (exit 2, under the subcommand's usage, with close flag names);
refusals saying what was asked and what is free; Ctrl-C ending with one line; ``status``
that stays short at fleet scale and has a JSON form; the allocation plot's two panels."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client

from libshared import events
from libshared.connecting import BusSettings
from libshared.devices import Device, NodeDevices
from libshared.ledgers import NodeLedger, PodCharge, Slice
from libshared.natsserver import NatsServer
from libshared.permissions import Role
from tests import signals
from tests.bus import helpers
from tests.bus.conftest import repo_root
from vslice import cli, replays_local, running, stacks, statuses

TRACES = Path(os.environ.get("VSLICE_TRACES") or repo_root().parent / "shared" / "traces" / "openb")
FLEET_CSV = "sn,cpu_milli,memory_mib,gpu,model\nn-0,64000,262144,2,T4\nn-1,64000,262144,2,T4\n"
PODS_CSV = "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec\n" + "".join(
    f"p-{i},1000,1024,1,{200 + 100 * (i % 5)},\n" for i in range(12)
)


@pytest.fixture(autouse=True)
def own_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A command that parses by mistake must not touch the user's stack."""
    monkeypatch.setenv("VSLICE_STATE_DIR", str(tmp_path / "state"))


def refused(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """The exit code and stderr of a command line that argparse refuses."""
    with pytest.raises(SystemExit) as exited:
        cli.main(list(argv))
    return int(exited.value.code or 0), capsys.readouterr().err


def test_version_prints_the_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"vslice {cli.version()}"
    assert cli.version() != "0+unknown"  # the package is installed (make install)


@pytest.mark.parametrize(
    ("argv", "usage", "message"),
    [
        (["run", "--gpumem", "0", "--", "true"], "vslice run", "--gpumem: 0: must be >= 1 MiB"),
        (["run", "--gpumem", "-5", "--", "true"], "vslice run", "--gpumem: -5: must be >= 1"),
        (["run", "--gpumem", "lots", "--", "true"], "vslice run", "'lots' is not an integer"),
        (
            ["run", "--gpucores", "150", "--", "true"],
            "vslice run",
            "--gpucores: 150: must be 0-100",
        ),
        (["run", "--gpucores", "-1", "--", "true"], "vslice run", "--gpucores: -1: must be 0-100"),
        (
            ["run", "--gpumem-percentage", "0", "--", "true"],
            "vslice run",
            "--gpumem-percentage: 0: must be 1-100",
        ),
        (
            ["run", "--gpumem-percentage", "101", "--", "true"],
            "vslice run",
            "--gpumem-percentage: 101: must be 1-100",
        ),
        (["run", "--gpus", "0", "--", "true"], "vslice run", "--gpus: 0: must be 1-8"),
        (["up", "--replicas", "0"], "vslice up", "--replicas: 0: must be 1-16"),
        (["up", "--policy", "binpak"], "vslice up", "did you mean hami-binpack"),
        (["up", "--mock-gpu-memory", "0"], "vslice up", "--mock-gpu-memory: 0: must be >= 1 MiB"),
        (["up", "--metrics-port", "70000"], "vslice up", "--metrics-port: 70000: must be 1-65535"),
        (
            ["replay", "t.csv", "--fleet", "f.csv", "--seeds", "51-42"],
            "vslice replay",
            "51-42 runs backwards; 42-51?",
        ),
        (
            ["replay", "t.csv", "--fleet", "f.csv", "--concurrency", "0"],
            "vslice replay",
            "must be >= 1",
        ),
        (
            ["replay", "t.csv", "--fleet", "f.csv", "--plot", "/nonexistent/x.png"],
            "vslice replay",
            "--plot: /nonexistent/x.png: folder /nonexistent does not exist",
        ),
        (
            ["replay", "t.csv", "--fleet", "f.csv", "--plot", "x.txt"],
            "vslice replay",
            "must end in .png",
        ),
        (
            ["replay", "t.csv", "--fleet", "f.csv", "--json", "/nonexistent/r.json"],
            "vslice replay",
            "folder /nonexistent does not exist",
        ),
    ],
)
def test_a_value_out_of_range_is_refused_under_its_subcommands_usage(
    capsys: pytest.CaptureFixture[str], argv: list[str], usage: str, message: str
) -> None:
    code, err = refused(capsys, *argv)
    assert code == 2
    assert err.startswith(f"usage: {usage} "), err
    assert message in err, err


@pytest.mark.parametrize(
    ("argv", "usage", "suggestion"),
    [
        (["run", "--gpumen", "5", "--", "true"], "vslice run", "--gpumen (did you mean --gpumem"),
        (["run", "--gpucroes=5", "--", "true"], "vslice run", "did you mean --gpucores"),
        (["up", "--replcias", "3"], "vslice up", "did you mean --replicas"),
        (["status", "--ndoes"], "vslice status", "did you mean --nodes"),
        (
            ["replay", "t.csv", "--fleet", "f.csv", "--sede", "3"],
            "vslice replay",
            "did you mean --seeds",
        ),
        (["stauts"], "vslice", "did you mean status"),
    ],
)
def test_a_mistyped_flag_or_command_is_answered_with_the_closest_names(
    capsys: pytest.CaptureFixture[str], argv: list[str], usage: str, suggestion: str
) -> None:
    code, err = refused(capsys, *argv)
    assert code == 2
    assert err.startswith(f"usage: {usage} "), err
    assert suggestion in err, err


def test_a_refused_value_is_refused_before_the_trace_is_read(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("the replay started")

    monkeypatch.setattr(replays_local, "replay_in_process", no_work)
    code, _ = refused(
        capsys, "replay", str(tmp_path / "absent.csv"), "--fleet", "f", "--in-process",
        "--plot", str(tmp_path / "no" / "x.png"),
    )  # fmt: skip
    assert code == 2


def test_up_help_describes_the_command_and_every_setting_with_its_environment_variable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        cli.main(["up", "--help"])
    out = capsys.readouterr().out
    assert "Start nats-server" in out
    for flag, var in cli.UP_ENV.items():
        assert "--" + flag.replace("_", "-") in out
        assert "$" + var in out


def test_up_flags_override_the_environment_which_is_the_fallback() -> None:
    args = cli.parse(["up", "--replicas", "3", "--mock-gpus", "4", "--metrics-port", "9500"])
    wanted = cli.up_settings(
        args,
        {
            "VSLICE_POLICY": "hami-spread",
            "VSLICE_REPLICAS": "5",
            "VSLICE_MOCKGPU_COUNT": "1",
            "VSLICE_NATS_PORT": "4333",
        },
    )
    assert (wanted.replicas, wanted.policy, wanted.nats_port) == (3, "hami-spread", 4333)
    env = wanted.environ
    assert env["VSLICE_MOCKGPU_COUNT"] == "4" and env["VSLICE_METRICS_PORT"] == "9500"
    default = cli.up_settings(cli.parse(["up"]), {})
    assert default == cli.UpSettings()


def test_a_malformed_environment_variable_of_up_is_refused_naming_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("VSLICE_REPLICAS", "zero")
    assert cli.main(["up", "--state-dir", str(tmp_path)]) == 2
    assert "VSLICE_REPLICAS='zero'" in capsys.readouterr().err
    assert not (tmp_path / "nats").exists()  # nothing started


def test_up_takes_a_node_config_checked_before_anything_starts(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = tmp_path / "config.json"
    good.write_text('{"nodeconfig": [{"name": "x-0", "devicesplitcount": 3}]}')
    monkeypatch.chdir(tmp_path)
    wanted = cli.up_settings(cli.parse(["up", "--node-config", "config.json"]), {})
    assert wanted.environ["VSLICE_NODE_CONFIG"] == str(good)
    agent = stacks.slice_agent_args(tmp_path / "state", wanted.environ)
    assert agent[agent.index("--node-config") + 1] == str(good)
    assert "--node-config" not in stacks.slice_agent_args(tmp_path / "state", {})

    bad = tmp_path / "bad.json"
    bad.write_text('{"nodeconfig": [{"name": "x-0", "devicesplitcount": -2}]}')
    state = tmp_path / "stack"
    for path, named in ((bad, "(value: -2)"), (tmp_path / "none.json", "No such file")):
        assert cli.main(["up", "--state-dir", str(state), "--node-config", str(path)]) == 2
        err = capsys.readouterr().err
        assert f"--node-config {path}" in err and named in err
    assert not state.exists()  # nothing started


def test_a_csv_with_a_wrong_header_is_refused_naming_the_expected_columns(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "bad2.csv").write_text("pod,cpu,mem\nx,1,2\n")
    (tmp_path / "fleet.csv").write_text(FLEET_CSV)
    argv = ["replay", str(tmp_path / "bad2.csv"), "--fleet", str(tmp_path / "fleet.csv")]
    assert cli.main([*argv, "--in-process", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert (
        "bad2.csv:1: header='pod,cpu,mem': missing column(s) cpu_milli, memory_mib, num_gpu" in err
    )
    assert "expected name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec" in err


def test_a_slice_without_a_core_limit_says_so_instead_of_zero_percent() -> None:
    placement = events.Placement(
        pod_uid="run-1",
        namespace="default",
        pod="run-1",
        node="vm-0",
        charge=PodCharge(pod_uid="run-1"),
        slices=(
            Slice(
                pod_uid="run-1", namespace="default", pod="run-1", container="main",
                container_index=0, uuid="GPU-a", device_index=0, memory_mib=512, cores_percent=0,
            ),
        ),
    )  # fmt: skip
    line = running.describe(placement)
    assert line.endswith("GPU-a 512 MiB no core limit") and "0%" not in line
    assert running.cores_text(30) == "30% cores"


def node_of(*memory_mib: int) -> NodeDevices:
    return NodeDevices(
        node="vm-0",
        devices=tuple(
            Device(uuid=f"GPU-{i}", index=i, type="A100", memory_mib=m, split_count=4)
            for i, m in enumerate(memory_mib)
        ),
    )


def held(uuid: str, memory_mib: int, cores: int, uid: str = "p") -> Slice:
    return Slice(
        pod_uid=uid, namespace="default", pod=uid, container="main", container_index=0,
        uuid=uuid, device_index=0, memory_mib=memory_mib, cores_percent=cores,
    )  # fmt: skip


def test_a_refusal_says_what_was_asked_and_the_largest_free_gpu() -> None:
    ledger = NodeLedger(node="vm-0", slices=(held("GPU-0", 8192, 50),))
    free = running.free_devices(node_of(16384, 16384), ledger)
    assert [(f.uuid, f.memory_mib, f.cores_percent, f.slots) for f in free] == [
        ("GPU-1", 16384, 100, 4),
        ("GPU-0", 8192, 50, 3),
    ]
    answer = events.Unschedulable(
        pod_uid="run-1", reason="0/1 nodes fit: 1 no fitting GPU",
        node_reasons={"vm-0": "2/2 CardInsufficientMemory"},
    )  # fmt: skip
    text = running.refusal_text(running.SliceRequest(memory_mib=999_999), free, answer)
    assert text.startswith(
        "asked 999,999 MiB, no core limit on 1 GPU; largest free: 16,384 MiB, 100% cores"
        " on vm-0/GPU-1 (2 GPUs with a free slot)"
    )
    assert "(scheduler: 0/1 nodes fit: 1 no fitting GPU (vm-0: 2/2 CardInsufficientMemory))" in text


def test_a_refusal_on_full_gpus_says_no_slot_is_free() -> None:
    full = NodeLedger(node="vm-0", slices=tuple(held("GPU-0", 10, 0, f"p{i}") for i in range(4)))
    free = running.free_devices(node_of(16384), full)
    answer = events.Unschedulable(pod_uid="run-1", reason="0/1 nodes fit")
    text = running.refusal_text(
        running.SliceRequest(memory_percent=50, cores_percent=30), free, answer
    )
    assert text.startswith("asked 50% of the memory, 30% cores on 1 GPU; no GPU of this node")


def test_ctrl_c_during_a_replay_ends_with_one_line_and_exit_130(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(replays_local, "replay_in_process", interrupted)
    (tmp_path / "pods.csv").write_text(PODS_CSV)
    (tmp_path / "fleet.csv").write_text(FLEET_CSV)
    argv = ["replay", str(tmp_path / "pods.csv"), "--fleet", str(tmp_path / "fleet.csv")]
    assert cli.main([*argv, "--in-process"]) == cli.EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert err.strip() == "vslice: interrupted"


@pytest.mark.skipif(not (TRACES / "openb_pod_list_default.csv").exists(), reason="no openb traces")
def test_ctrl_c_during_a_parallel_replay_prints_no_traceback_from_any_process(
    tmp_path: Path,
) -> None:
    argv = [
        sys.executable, "-m", "vslice.cli", "replay", str(TRACES / "openb_pod_list_default.csv"),
        "--fleet", str(TRACES / "openb_node_list_gpu_node.csv"),
        "--in-process", "--seeds", "1-6", "--jobs", "2",
    ]  # fmt: skip
    with subprocess.Popen(
        argv, cwd=repo_root(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        start_new_session=True, preexec_fn=signals.interruptible,
    ) as proc:  # fmt: skip
        assert proc.stderr is not None
        try:
            # once the first experiment is done the pool's workers are up and replaying
            # (an interrupt while the pool forks them is another test's matter)
            deadline = time.monotonic() + 180
            seen = ""
            while "1/6" not in seen:
                assert time.monotonic() < deadline and proc.poll() is None, seen
                seen += proc.stderr.read(1)
            os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole group
            err = seen + proc.stderr.read()
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert code == cli.EXIT_INTERRUPTED, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.rstrip().endswith("vslice: interrupted")


def devices_of(nodes: int, gpus: int) -> list[stacks.DeviceUse]:
    return [
        stacks.DeviceUse(
            node=f"openb-node-{n:04d}", uuid=f"openb-node-{n:04d}-gpu{g}", slices=n % 3,
            memory_mib=1000 * (n % 3), memory_total_mib=16000, cores=10 * (n % 3), split_count=100,
        )
        for n in range(nodes)
        for g in range(gpus)
    ] + [
        stacks.DeviceUse(
            node="laptop-0", uuid="GPU-mock-a", slices=1, memory_mib=300,
            memory_total_mib=8000, cores=0, split_count=10,
        )
    ]  # fmt: skip


def test_status_of_a_1200_node_fleet_is_a_few_lines_of_totals_per_node_group() -> None:
    stack = stacks.Stack(
        nats_url="nats://127.0.0.1:4222", prefix="vslice", pids={"nats": 11, "scheduler-1": 12},
        state_dir="/s",
    )  # fmt: skip
    devices = devices_of(1200, 5)
    data = statuses.status(Path("/s"), stack, alive=lambda pid: pid == 11, devices=devices)
    text = statuses.text(data)
    assert len(text.splitlines()) < 20, text
    rows = {line.split()[0]: line.split() for line in text.splitlines()[5:] if line.strip()}
    want_slices = sum(d.slices for d in devices if d.node.startswith("openb"))
    assert rows["openb-node"][1:4] == ["1,200", "6,000", f"{want_slices:,}"]
    assert rows["laptop"][1:4] == ["1", "1", "1"]
    assert rows["fleet"][2] == "6,001"
    assert "scheduler-1" in text and "NOT RUNNING" in text  # pid 12 is not alive
    table = statuses.text(
        statuses.status(Path("/s"), stack, alive=bool, devices=devices, nodes=True), table=True
    )
    assert len(table.splitlines()) > 6000


def test_status_counts_devices_per_vendor_and_names_each_devices_vendor() -> None:
    stack = stacks.Stack(
        nats_url="nats://127.0.0.1:4222", prefix="vslice", pids={"nats": 11}, state_dir="/s"
    )
    devices = [
        *devices_of(1, 2),
        stacks.DeviceUse(
            node="mixed-0", uuid="DCU-mock-a", slices=1, memory_mib=2000,
            memory_total_mib=32768, cores=100, split_count=10, vendor="DCU",
        ),
    ]  # fmt: skip
    data = statuses.status(Path("/s"), stack, alive=bool, devices=devices, nodes=True)
    assert data["fleet"]["vendors"] == {"DCU": 1, "NVIDIA": 3}
    text = statuses.text(data)
    assert "devices by vendor: DCU 1, NVIDIA 3" in text
    (row,) = [line for line in text.splitlines() if line.startswith("mixed-0")]
    assert row.split()[1:3] == ["DCU-mock-a", "DCU"]
    only_gpus = statuses.status(Path("/s"), stack, alive=bool, devices=devices_of(1, 2), nodes=True)
    text = statuses.text(only_gpus)
    assert "by vendor" not in text and "vendor" not in text.splitlines()[-1]
    (row,) = [line for line in text.splitlines() if line.startswith("laptop-0")]
    assert row.split()[1:] == ["GPU-mock-a", "1/10", "300/8000", "0"]  # no vendor column


def test_status_json_gives_the_nats_url_and_each_process_with_its_pid_and_state() -> None:
    stack = stacks.Stack(
        nats_url="nats://127.0.0.1:4222", prefix="vslice", pids={"nats": 11, "metrics": 13},
        state_dir="/s",
    )  # fmt: skip
    data = statuses.status(Path("/s"), stack, alive=lambda pid: pid == 11, devices=devices_of(3, 2))
    again: dict[str, Any] = json.loads(json.dumps(data))
    assert again["nats_url"] == "nats://127.0.0.1:4222" and again["up"] is True
    assert again["processes"] == {
        "nats": {"pid": 11, "state": "running"},
        "metrics": {"pid": 13, "state": "stopped"},
    }
    assert again["fleet"]["gpus"] == 7 and "devices" not in again["fleet"]


async def test_vslice_status_reads_a_running_stacks_fleet_and_prints_json(
    nc: Client, nats_server: NatsServer, bus_settings: BusSettings, tmp_path: Path
) -> None:
    await helpers.register(nc, bus_settings, helpers.fleet(nodes=40, gpus=2))
    prefix = bus_settings.prefix
    nats_server.identity(f"operator-{prefix}", Role.OPERATOR, prefix=prefix)  # status reads so
    stacks.write_state(
        tmp_path,
        stacks.Stack(
            nats_url=bus_settings.urls[0], prefix=prefix,
            pids={"nats": os.getpid()}, state_dir=str(tmp_path),
            trust_dir=str(nats_server.store.root),
        ),
    )  # fmt: skip

    def vslice(*argv: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "vslice.cli", *argv, "--state-dir", str(tmp_path)],
            cwd=repo_root(), capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        return out.stdout

    data = json.loads(vslice("status", "--json"))
    assert data["nats_url"] == bus_settings.urls[0]
    assert data["processes"]["nats"] == {"pid": os.getpid(), "state": "running"}
    assert (data["fleet"]["nodes"], data["fleet"]["gpus"], data["fleet"]["error"]) == (40, 80, None)
    short = vslice("status")
    assert "node " in short and "GPU-7-1" not in short and len(short.splitlines()) < 15
    assert "GPU-7-1" in vslice("status", "--nodes")


def test_the_plot_has_a_whole_run_panel_and_a_zoomed_panel_with_the_seed_band(
    tmp_path: Path,
) -> None:
    (tmp_path / "pods.csv").write_text(PODS_CSV)
    (tmp_path / "fleet.csv").write_text(FLEET_CSV)
    reports = replays_local.replay_in_process(
        str(tmp_path / "pods.csv"), str(tmp_path / "fleet.csv"), ["fgd", "bestfit"], [1, 2, 3],
        jobs=1, quiet=True,
    )  # fmt: skip
    for r in reports:
        band = r["curve_band"]
        assert [b[0] for b in band] == [a for a, _ in r["curve"]]
        assert all(
            lo <= mean + 1e-9 and mean <= hi + 1e-9
            for (_, lo, hi), (_, mean) in zip(band, r["curve"], strict=True)
        )
    path = tmp_path / "plot.svg"
    replays_local.plot(str(path), reports)
    svg = path.read_text()
    # two panels (axes), one per title; the zoomed one spans 80-100 % allocation
    assert svg.count('id="axes_') == 2
    assert "zoom: allocation 80-100 %" in svg
    png = tmp_path / "plot.png"
    replays_local.plot(str(png), reports)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ctrl_c_during_a_bus_replay_ends_with_one_line_and_stops_its_stack(
    tmp_path: Path,
) -> None:
    # 80 GPUs: about 260 pods a seed (arrivals stop at 1.3 x the fleet's GPUs), so the
    # replay is still running when Ctrl-C lands on a loaded machine (4 GPUs gave 14 pods a
    # seed, and all three seeds were done before the signal)
    nodes = "".join(f"n-{i},64000,262144,2,T4\n" for i in range(40))
    (tmp_path / "fleet.csv").write_text("sn,cpu_milli,memory_mib,gpu,model\n" + nodes)
    rows = "".join(f"p-{i},1000,1024,1,{200 + 100 * (i % 5)},\n" for i in range(4000))
    (tmp_path / "pods.csv").write_text(
        "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec\n" + rows
    )
    argv = [
        sys.executable, "-m", "vslice.cli", "replay", str(tmp_path / "pods.csv"),
        "--fleet", str(tmp_path / "fleet.csv"), "--seeds", "1-3", "--concurrency", "1",
    ]  # fmt: skip
    with subprocess.Popen(
        argv, cwd=repo_root(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        start_new_session=True, preexec_fn=signals.interruptible,
    ) as proc:  # fmt: skip
        assert proc.stderr is not None
        try:
            deadline = time.monotonic() + 180
            seen = ""
            while "seed 1:" not in seen:  # the pods' progress bar: the stack serves
                assert time.monotonic() < deadline and proc.poll() is None, seen
                seen += proc.stderr.read(1)
            os.killpg(proc.pid, signal.SIGINT)
            try:
                _, rest = proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                # say what still runs in the replay's process group (holding its stderr)
                left = subprocess.run(
                    ["ps", "-o", "pid,stat,args", "-g", str(proc.pid)],
                    capture_output=True, text=True, check=False,
                ).stdout  # fmt: skip
                raise AssertionError(f"not ended 120 s after Ctrl-C:\n{left}\n{seen}") from None
            err = seen + rest
            code = proc.returncode
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert code == cli.EXIT_INTERRUPTED, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.rstrip().endswith("vslice: interrupted")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_up_flags_reach_the_stack_it_starts(tmp_path: Path) -> None:
    state = str(tmp_path / "stack")
    nats_port, metrics_port = free_port(), free_port()

    def vslice(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "vslice.cli", *argv, "--state-dir", state],
            cwd=repo_root(), capture_output=True, text=True, timeout=120,
            env={**os.environ, "VSLICE_REPLICAS": "3", "VSLICE_MOCKGPU_COUNT": "5"},
        )  # fmt: skip

    (tmp_path / "pods.csv").write_text(PODS_CSV)
    refused = vslice("up", "--policy", "fgd")
    assert refused.returncode == 2 and "--policy fgd needs --workload-trace" in refused.stderr
    started = vslice(
        "up", "--replicas", "1", "--policy", "fgd", "--workload-trace", str(tmp_path / "pods.csv"),
        "--backend", "mock", "--mock-gpus", "3",
        "--mock-gpu-memory", "4096", "--nats-port", str(nats_port),
        "--metrics-port", str(metrics_port),
    )  # fmt: skip
    try:
        assert started.returncode == 0, started.stderr
        assert "1 scheduler replica, policy fgd" in started.stdout
        data = json.loads(vslice("status", "--json").stdout)
        assert data["nats_url"] == f"nats://127.0.0.1:{nats_port}"
        assert data["metrics_url"] == f"http://127.0.0.1:{metrics_port}"
        assert data["policy"] == "fgd"
        schedulers = [name for name in data["processes"] if name.startswith("scheduler-")]
        assert schedulers == ["scheduler-1"]  # the flag, not $VSLICE_REPLICAS
        assert all(p["state"] == "running" for p in data["processes"].values())
        fleet = data["fleet"]
        assert (fleet["gpus"], fleet["memory_total_mib"]) == (3, 3 * 4096)
    finally:
        vslice("down")


def test_a_fleet_csv_with_a_wrong_header_is_refused_naming_the_expected_columns(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "pods.csv").write_text(PODS_CSV)
    (tmp_path / "fleet.csv").write_text("node,gpus\nn-0,2\n")
    argv = ["replay", str(tmp_path / "pods.csv"), "--fleet", str(tmp_path / "fleet.csv")]
    assert cli.main([*argv, "--in-process", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "fleet.csv:1: header='node,gpus': missing column(s) sn, cpu_milli, memory_mib" in err
    assert "expected sn,cpu_milli,memory_mib,gpu,model" in err


def test_a_reader_that_closes_the_pipe_early_ends_vslice_quietly_with_141() -> None:
    program = (
        "import sys\n"
        "from vslice import cli\n"
        "def flood(args):\n"
        "    for n in range(10**6):\n"
        "        print('node', n)\n"
        "    return 0\n"
        "cli._stack = flood\n"
        "sys.exit(cli.main(['status']))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", program], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.read(10) == b"node 0\nnod"
    proc.stdout.close()
    err = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 141
    assert err == b""


def test_ctrl_c_while_asyncio_builds_its_event_loop_ends_with_one_line(tmp_path: Path) -> None:
    # Ctrl-C landing inside asyncio.run() while it makes its loop left a half-built loop
    # whose finalizer failed, and a never-awaited coroutine, both reported after the line
    stacks.write_state(
        tmp_path,
        stacks.Stack(
            nats_url="nats://127.0.0.1:1", prefix="vslice", pids={"nats": os.getpid()},
            state_dir=str(tmp_path),
        ),
    )  # fmt: skip
    code = (
        "import asyncio.selector_events as se, sys\n"
        "def interrupted(self): raise KeyboardInterrupt\n"
        "se.BaseSelectorEventLoop._make_self_pipe = interrupted\n"
        "from vslice import cli\n"
        f"sys.exit(cli.main(['release', 'p', '--state-dir', {str(tmp_path)!r}]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=repo_root(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == cli.EXIT_INTERRUPTED, done.stderr
    assert done.stderr.strip() == "vslice: interrupted", done.stderr
