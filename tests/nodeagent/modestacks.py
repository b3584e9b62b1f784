"""A ``vslice up`` stack on mock GPUs whose node runs in a device mode (``mig``, ``mps``),
for the end-to-end tests of those modes: its node config written, up, then down."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.libvgpu import harness
from vslice import stacks

CLI = [sys.executable, "-m", "vslice.cli"]


@contextlib.contextmanager
def mode_stack(state: Path, mode: str, devices: str, **env: str) -> Iterator[dict[str, Any]]:
    """``vslice up`` in ``state`` on mock ``devices`` (``VSLICE_MOCKGPU_DEVICES`` text)
    with a node config putting this machine's node in operating mode ``mode`` and ``env``
    over this process's environment; yields the stack's state record (``vslice down``
    after)."""
    config = state.parent / f"{state.name}-config.json"
    config.write_text(
        json.dumps({"nodeconfig": [{"name": stacks.local_node(), "operatingmode": mode}]})
    )
    full = {
        **os.environ,
        "VSLICE_MOCKGPU_DEVICES": devices,
        "VSLICE_NODE_CONFIG": str(config),
        "VSLICE_GPU_BACKEND": "mock",
        **env,
    }

    def cli(command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CLI, command, "--state-dir", str(state)],
            cwd=harness.ROOT,
            env=full,
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )

    started = cli("up")
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        recorded: dict[str, Any] = json.loads((state / stacks.STATE_FILE).read_text())
        yield {**recorded, "env": full}
    finally:
        cli("down")
