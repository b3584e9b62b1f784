"""The node's MPS server on real GPUs: NVIDIA's ``nvidia-cuda-mps-control`` daemon.

In operating mode ``mps`` every slice's processes are clients of one MPS control daemon
per node, which starts an MPS server for them and holds each client to the
``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT`` and ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` its
environment names (NVIDIA, "Multi-Process Service", sections "Starting and Stopping MPS
on Linux" and "Environment Variables"). The daemon is started with ``-d`` and the pipe
and log directories in ``CUDA_MPS_PIPE_DIRECTORY`` / ``CUDA_MPS_LOG_DIRECTORY``; it is
stopped by writing ``quit`` to its control program. On the mock GPU no daemon runs: the
mock driver applies the same variables itself.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from services.nodeagent.core.preparing import Mps

log = logging.getLogger("vslice.nodeagent")

CONTROL = "nvidia-cuda-mps-control"
TIMEOUT_S = 30.0


@dataclass
class MpsServer:
    """The control daemon for ``mps``'s directories; ``binary``: its program."""

    mps: Mps
    binary: str = CONTROL
    started: bool = False

    def env(self) -> dict[str, str]:
        """The daemon's environment: this process's with the two directories."""
        return {
            **os.environ,
            "CUDA_MPS_PIPE_DIRECTORY": self.mps.pipe_dir,
            "CUDA_MPS_LOG_DIRECTORY": self.mps.log_dir,
        }

    def make_dirs(self) -> None:
        """Create the pipe and log directories (all the mock driver needs)."""
        for d in (self.mps.pipe_dir, self.mps.log_dir):
            Path(d).mkdir(parents=True, exist_ok=True)

    def start(self) -> bool:
        """Create the directories and start the daemon; False (logged) when its program
        is not installed or it does not start: slices are then prepared, and their
        programs find no MPS server."""
        self.make_dirs()
        program = shutil.which(self.binary)
        if program is None:
            log.error("MPS control daemon not found", extra={"program": self.binary})
            return False
        done = subprocess.run(
            [program, "-d"],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            check=False,
        )
        if done.returncode != 0:
            log.error("MPS control daemon not started", extra={"error": done.stderr.strip()})
            return False
        self.started = True
        log.info("MPS control daemon started", extra={"pipe_dir": self.mps.pipe_dir})
        return True

    def stop(self) -> None:
        """Tell a daemon this server started to quit."""
        program = shutil.which(self.binary)
        if not self.started or program is None:
            return
        subprocess.run(
            [program],
            input="quit\n",
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            check=False,
        )
        self.started = False
        log.info("MPS control daemon stopped")
