"""TLS server contexts from PEM files that a Secret volume (or a renewal) swaps in place.

The webhook and the extender serve HTTPS with certificates the certificate Job writes into
Secrets; kubelet updates a mounted Secret by swinging its ``..data`` symlink, and
``vslice certs`` renews files in place. ``ReloadingContext`` loads the pair, optionally
asks every client for a certificate from ``client_ca`` (mutual TLS), and ``watch`` reloads
the pair into the live context when the files change, so new connections get the new
certificate without a restart. A pair that does not load is logged and the old one kept.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from dataclasses import dataclass, field

log = logging.getLogger("vslice.tls")


def server_context(cert: str, key: str, *, client_ca: str | None = None) -> ssl.SSLContext:
    """A TLS server context (TLS 1.2 or later) holding ``cert`` (PEM chain) and ``key``;
    with ``client_ca`` every client must present a certificate that CA signed.

    Raises ``OSError`` for a missing file, ``ssl.SSLError`` for a key that does not match
    or PEM that does not parse.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    if client_ca:
        context.load_verify_locations(cafile=client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def stamp(*paths: str) -> tuple[tuple[int, int], ...]:
    """Modification time and inode of each path (following symlinks); raises ``OSError``."""
    out = []
    for p in paths:
        st = os.stat(p)  # follows the Secret volume's ..data symlink
        out.append((st.st_mtime_ns, st.st_ino))
    return tuple(out)


@dataclass
class ReloadingContext:
    """The live server context of ``cert``/``key`` (and ``client_ca``); ``reloads``
    counts the reloads ``watch`` made. Raises as ``server_context`` does at creation."""

    cert: str
    key: str
    client_ca: str | None = None
    reloads: int = 0
    context: ssl.SSLContext = field(init=False)
    _stamp: tuple[tuple[int, int], ...] = field(init=False)

    def __post_init__(self) -> None:
        self.context = server_context(self.cert, self.key, client_ca=self.client_ca)
        self._stamp = stamp(*self._paths())

    def _paths(self) -> list[str]:
        return [self.cert, self.key, *([self.client_ca] if self.client_ca else [])]

    def reload_if_changed(self) -> bool:
        """Reload the files into the live context when they changed; True when it did."""
        try:
            now = stamp(*self._paths())
            if now == self._stamp:
                return False
            # Check the pair in a fresh context first: a failed load into the live one
            # could leave it holding a new certificate with the old key.
            server_context(self.cert, self.key, client_ca=self.client_ca)
            self.context.load_cert_chain(self.cert, self.key)
            if self.client_ca:
                self.context.load_verify_locations(cafile=self.client_ca)
        except (OSError, ssl.SSLError) as exc:
            log.warning("certificate not reloaded", extra={"error": str(exc)})
            return False
        self._stamp = now
        self.reloads += 1
        log.info("certificate reloaded", extra={"cert": self.cert})
        return True

    async def watch(self, interval_s: float) -> None:
        """Check the files every ``interval_s`` seconds, forever (cancel to stop)."""
        while True:
            await asyncio.sleep(interval_s)
            self.reload_if_changed()
