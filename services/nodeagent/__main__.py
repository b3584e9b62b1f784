"""``python -m services.nodeagent [flags]``: mock nodes for a replay, or this machine's node with
real slices (``--host-root``)."""

from __future__ import annotations

import sys

from libshared import connecting, logs
from services.nodeagent import app, settings


def run(argv: list[str]) -> int:
    """Parse settings, log as JSON, serve until SIGTERM; returns the exit code."""
    config = settings.parse(argv)
    logs.setup("nodeagent", level=config.log_level)
    return connecting.run_service(app.main(config), service="nodeagent")


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
