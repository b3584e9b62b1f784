"""Reading HAMi's device plugin ``config.json`` from disk (``core.nodeconfigs`` decides
what it means): at most ``nodeconfigs.MAX_BYTES`` + 1 bytes are read, so a file over the
bound is refused by the parser without being read whole."""

from __future__ import annotations

from services.nodeagent.core import nodeconfigs
from services.nodeagent.core.registrations import Scaling


def read(path: str) -> bytes:
    """The file's first ``MAX_BYTES`` + 1 bytes. Raises ``OSError``."""
    with open(path, "rb") as f:
        return f.read(nodeconfigs.MAX_BYTES + 1)


def load(path: str, node: str, defaults: Scaling) -> tuple[bytes, nodeconfigs.NodeSettings]:
    """The file at ``path`` and ``node``'s settings from it. Raises ``OSError``
    (unreadable) or ``nodeconfigs.NodeConfigError`` (refused: the message names the key
    and value)."""
    data = read(path)
    return data, nodeconfigs.load(data, node, defaults, source=path)
