"""``python -m services.scheduler [flags]``: run one scheduler replica (see ``settings``)."""

from __future__ import annotations

import sys

from libshared import connecting, logs
from services.scheduler import app, settings


def run(argv: list[str]) -> int:
    """Parse settings, log as JSON, serve until SIGTERM; returns the exit code."""
    config = settings.parse(argv)
    logs.setup("scheduler", level=config.log_level)
    return connecting.run_service(app.main(config), service="scheduler")


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
