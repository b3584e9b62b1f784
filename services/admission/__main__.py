"""``python -m services.admission [flags]``: the bus handler and/or the HTTPS webhook."""

from __future__ import annotations

import logging
import ssl
import sys

from libshared import connecting, logs
from services.admission import app, settings


def run(argv: list[str]) -> int:
    """Parse settings, log as JSON, serve until SIGTERM; returns the exit code."""
    config = settings.parse(argv)
    logs.setup("admission", level=config.log_level)
    try:
        return connecting.run_service(app.main(config), service="admission")
    except (OSError, ssl.SSLError, ValueError) as exc:
        # an unreadable certificate, a taken port, an unreachable bus: say so, exit 1
        logging.getLogger("vslice.admission").error(
            "cannot serve", extra={"error": f"{type(exc).__name__}: {exc}"}
        )
        return 1


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
