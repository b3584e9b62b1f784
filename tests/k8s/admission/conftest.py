"""Fixtures of the webhook's HTTPS tests: a trustme CA, a certificate for the Service's
DNS names and 127.0.0.1 written where a Secret volume would mount it, and the server."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import trustme

from services.admission.adapters import webhook
from services.admission.core import mutating

SERVICE_NAMES = ("vslice-admission.vslice-system.svc", "127.0.0.1")


@dataclass
class Tls:
    ca: trustme.CA
    cert: Path
    key: Path

    def issue(self, ca: trustme.CA) -> None:
        """Write a certificate of ``ca`` over the mounted files (a renewal)."""
        issued = ca.issue_cert(*SERVICE_NAMES)
        self.cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
        self.key.write_bytes(issued.private_key_pem.bytes())

    def client_context(self, ca: trustme.CA | None = None) -> ssl.SSLContext:
        """A client context trusting ``ca`` (default: the first CA) only."""
        context = ssl.create_default_context()
        (ca or self.ca).configure_trust(context)
        return context


@pytest.fixture
def tls(tmp_path: Path) -> Tls:
    mounted = Tls(ca=trustme.CA(), cert=tmp_path / "tls.crt", key=tmp_path / "tls.key")
    mounted.issue(mounted.ca)
    return mounted


@dataclass
class Running:
    server: webhook.Server
    url: str
    session: aiohttp.ClientSession


@pytest.fixture
async def running(tls: Tls) -> AsyncIterator[Running]:
    server = webhook.Server(
        webhook=webhook.Webhook(settings=mutating.MutationSettings()),
        cert=str(tls.cert),
        key=str(tls.key),
        host="127.0.0.1",
        port=0,
        reload_s=0.05,
    )
    port = await server.start()
    connector = aiohttp.TCPConnector(ssl=tls.client_context())
    async with aiohttp.ClientSession(connector=connector) as session:
        try:
            yield Running(server=server, url=f"https://127.0.0.1:{port}", session=session)
        finally:
            await server.stop()
