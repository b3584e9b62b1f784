"""Running the libvgpu test programs against the mock GPU.

A ``Container`` is what the node agent gives one container: its own shared
cache file and mock GPU state, and the slice's environment. Programs get only
``LD_LIBRARY_PATH`` (the mock driver), ``LD_PRELOAD`` (libvgpu) and the slice's
variables, never the test runner's environment.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[2]
LIBVGPU_DIR = ROOT / "services" / "nodeagent" / "libvgpu"
MOCK_DIR = ROOT / "services" / "nodeagent" / "mockgpu"
BUILD = LIBVGPU_DIR / "build"
LIBVGPU = LIBVGPU_DIR / "libvgpu.so"
LIBVGPU_ASAN = LIBVGPU_DIR / "libvgpu-asan.so"

MIB = 1 << 20
CUDA_SUCCESS = 0
CUDA_ERROR_INVALID_VALUE = 1
CUDA_ERROR_OUT_OF_MEMORY = 2


def build_native() -> None:
    """Build the mock driver, libvgpu and the test programs (a no-op when current)."""
    for folder in (MOCK_DIR, LIBVGPU_DIR):
        subprocess.run(["make", "-s", "-C", str(folder)], check=True, capture_output=True)


@dataclass(frozen=True)
class Line:
    """One result line of a probe: ``<command> key=value ...``."""

    command: str
    values: dict[str, str]

    def int(self, key: str) -> int:
        return int(self.values[key])


def parse(stdout: str) -> list[Line]:
    lines = []
    for raw in stdout.splitlines():
        words = raw.split()
        if not words:
            continue
        values = dict(w.split("=", 1) for w in words[1:] if "=" in w)
        lines.append(Line(words[0], values))
    return lines


@dataclass(frozen=True)
class Result:
    returncode: int
    lines: list[Line]
    stderr: str

    def of(self, command: str) -> list[Line]:
        return [line for line in self.lines if line.command == command]


@dataclass
class Container:
    """One container's slice on the mock GPU."""

    root: Path
    env: dict[str, str] = field(default_factory=dict)
    preload: Path | None = LIBVGPU

    @property
    def cache(self) -> Path:
        return self.root / "vgpu.cache"

    def environment(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {
            "LD_LIBRARY_PATH": str(MOCK_DIR),
            "VSLICE_MOCKGPU_STATE": str(self.root / "mockgpu.state"),
            "CUDA_DEVICE_MEMORY_SHARED_CACHE": str(self.cache),
        }
        if self.preload is not None:
            env["LD_PRELOAD"] = str(self.preload)
        env.update(self.env)
        env.update(extra or {})
        return env

    def run(
        self,
        program: str,
        *args: str,
        env: dict[str, str] | None = None,
        timeout_s: float = 60,
    ) -> Result:
        proc = subprocess.run(
            [str(BUILD / program), *args],
            env=self.environment(env),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        assert proc.returncode == 0, (
            f"{program} {shlex.join(args)} exited {proc.returncode}: {proc.stderr}"
        )
        return Result(proc.returncode, parse(proc.stdout), proc.stderr)

    def start(self, program: str, *args: str, env: dict[str, str] | None = None) -> Running:
        proc = subprocess.Popen(
            [str(BUILD / program), *args],
            env=self.environment(env),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        return Running(proc)


class Running:
    """A probe running in the background, driven line by line."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _stdout(self) -> IO[str]:
        assert self.proc.stdout is not None
        return self.proc.stdout

    def read_line(self) -> Line:
        raw = self._stdout().readline()
        assert raw, f"probe exited early: {self.proc.stderr.read() if self.proc.stderr else ''}"
        return parse(raw)[0]

    def read_until(self, command: str) -> list[Line]:
        seen = []
        while True:
            line = self.read_line()
            seen.append(line)
            if line.command == command:
                return seen

    def resume(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def finish(self, timeout_s: float = 30) -> Result:
        out, err = self.proc.communicate(input="\n" * 8, timeout=timeout_s)
        return Result(self.proc.returncode, parse(out), err)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.communicate(timeout=10)


def busy_fractions(
    trace: Path, *, start_ns: int, stop_ns: int, window_ns: int = 2_000_000_000
) -> list[float]:
    """Device busy fraction (percent) of every ``window_ns`` window, stepped by 50 ms.

    Windows lie between the first kernel's start and ``stop_ns`` (when the
    program stopped launching); intervals come from the mock's trace file.
    """
    intervals = []
    for raw in trace.read_text().splitlines():
        _device, _pid, start, end = raw.split()
        intervals.append((int(start), int(end)))
    assert intervals, "no kernel ran"
    first = min(max(start_ns, s) for s, _ in intervals)
    fractions = []
    t = first
    while t + window_ns <= stop_ns:
        busy = sum(max(0, min(e, t + window_ns) - max(s, t)) for s, e in intervals)
        fractions.append(100.0 * busy / window_ns)
        t += 50_000_000
    assert fractions, "the run was shorter than one window"
    return fractions


def busy_intervals(trace: Path) -> list[tuple[int, int]]:
    """The mock's trace as sorted ``(start_ns, end_ns)`` runs of a busy device.

    Intervals of every process that touch or overlap are merged, so each run is
    a stretch the device never idled in.
    """
    raw = sorted(
        (int(start), int(end))
        for _device, _pid, start, end in (line.split() for line in trace.read_text().splitlines())
    )
    assert raw, "no kernel ran"
    runs = [raw[0]]
    for start, end in raw[1:]:
        last_start, last_end = runs[-1]
        if start <= last_end:
            runs[-1] = (last_start, max(last_end, end))
        else:
            runs.append((start, end))
    return runs


def busy_percent(runs: list[tuple[int, int]], *, start_ns: int, stop_ns: int) -> float:
    """Percent of ``[start_ns, stop_ns)`` that ``runs`` (from ``busy_intervals``) kept busy."""
    busy = sum(max(0, min(e, stop_ns) - max(s, start_ns)) for s, e in runs)
    return 100.0 * busy / (stop_ns - start_ns)


def wait_for(predicate: object, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return
        time.sleep(0.01)
    raise AssertionError("condition not met in time")


def nm_undefined(library: Path) -> Sequence[str]:
    out = subprocess.run(
        ["nm", "-D", "--undefined-only", str(library)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line.split()[-1] for line in out.splitlines() if line.strip()]


def glibc_versions(library: Path) -> set[tuple[int, ...]]:
    """Every ``GLIBC_x.y[.z]`` version ``objdump -T`` (binutils) shows ``library`` needs."""
    out = subprocess.run(
        ["objdump", "-T", str(library)], capture_output=True, text=True, check=True
    ).stdout
    return {
        tuple(int(x) for x in m.group(1).split("."))
        for m in re.finditer(r"\bGLIBC_(\d+(?:\.\d+)+)\b", out)
    }


def needed(library: Path) -> list[str]:
    """The ``DT_NEEDED`` entries of ``library`` (``objdump -p``)."""
    out = subprocess.run(
        ["objdump", "-p", str(library)], capture_output=True, text=True, check=True
    ).stdout
    return [line.split()[1] for line in out.splitlines() if line.split()[:1] == ["NEEDED"]]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
