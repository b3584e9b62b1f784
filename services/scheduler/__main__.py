"""``python -m services.scheduler [flags]``: run one scheduler replica (see ``settings``)."""

from __future__ import annotations

import asyncio
import sys

from libshared import logs
from services.scheduler import app, settings


def run(argv: list[str]) -> int:
    """Parse settings, log as JSON, serve until SIGTERM; returns the exit code."""
    config = settings.parse(argv)
    logs.setup("scheduler", level=config.log_level)
    asyncio.run(app.main(config))
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
