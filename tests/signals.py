"""Children a test interrupts with SIGINT, as a terminal's Ctrl-C would."""

from __future__ import annotations

import signal


def interruptible() -> None:
    """A ``preexec_fn`` that gives the child SIGINT's default disposition: a test run
    from a background job (``make test &``, a CI runner's shell) inherits SIGINT ignored,
    exec keeps it ignored, and Python then installs no KeyboardInterrupt handler -- the
    child would never see the Ctrl-C the test sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
