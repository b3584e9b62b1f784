"""Reading a container's shared cache file from the node's disk.

The decoding is ``services.nodeagent.core.sharedcaches``; this module only
reads the bytes, which libvgpu processes may be changing at the same moment:
each field is naturally aligned and written atomically, so a read sees every
field whole, if not all fields at one instant.
"""

from __future__ import annotations

from pathlib import Path

from services.nodeagent.core import sharedcaches


def read_shared_cache(path: Path) -> sharedcaches.SharedCache:
    """Read and decode the shared cache at ``path``.

    Raises ``OSError`` if the file cannot be read and
    ``sharedcaches.SharedCacheError`` if its contents are not a version-2 cache.
    """
    return sharedcaches.decode(path.read_bytes())
