"""The Kubernetes MutatingAdmissionWebhook: HTTPS ``POST /mutate`` answered by the core.

Thin route glue: bound the body (1 MiB), decode, call ``mutating.decide``, encode, log the
decision. A body that is too large gets 413, one that is not an ``admission.k8s.io/v1``
AdmissionReview request gets 400, each with a JSON ``{"error": ...}`` naming the problem;
nothing a client sends ends the server. ``/healthz`` answers while the process runs,
``/readyz`` while it accepts reviews (503 once it is stopping, so the Service stops
sending it reviews before it exits).

TLS comes from the mounted Secret's PEM files; they are checked every ``reload_s``
seconds and a renewed certificate (cert-manager rotates it in place) is loaded for the
next handshakes without a restart. A renewal that cannot be loaded is logged and the
previous certificate stays in use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web

from services.admission.core import mutating

log = logging.getLogger("vslice.admission.webhook")

MAX_BODY_BYTES = 1 << 20  # 1 MiB; the API server's own request limit is 3 MiB
JSON = "application/json"
_ENCODER = msgspec.json.Encoder()


@dataclass
class Counters:
    """Reviews answered, by verdict, and bodies rejected (``errors``)."""

    mutated: int = 0
    unchanged: int = 0
    skipped: int = 0
    denied: int = 0
    errors: int = 0


def _error(status: int, message: str) -> web.Response:
    return web.Response(status=status, body=_ENCODER.encode({"error": message}), content_type=JSON)


@dataclass
class Webhook:
    """The routes of the webhook and what they share."""

    settings: mutating.MutationSettings
    counters: Counters = field(default_factory=Counters)
    ready: bool = False

    def app(self) -> web.Application:
        """The aiohttp application: ``POST /mutate``, ``GET /healthz``, ``GET /readyz``."""
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.add_routes(
            [
                web.post("/mutate", self.mutate),
                web.get("/healthz", self.healthz),
                web.get("/readyz", self.readyz),
            ]
        )
        return app

    async def healthz(self, request: web.Request) -> web.Response:
        """200 while the process serves requests."""
        return web.Response(text="ok")

    async def readyz(self, request: web.Request) -> web.Response:
        """200 while reviews are accepted, 503 before start and once stopping."""
        if self.ready:
            return web.Response(text="ok")
        return web.Response(status=503, text="not ready")

    async def _body(self, request: web.Request) -> bytes | web.Response:
        too_large = (
            f"request body over {MAX_BODY_BYTES} bytes (1 MiB); an AdmissionReview of one "
            "pod is far smaller"
        )
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            return _error(413, f"{too_large}: Content-Length {request.content_length}")
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _error(413, too_large)

    async def mutate(self, request: web.Request) -> web.Response:
        """Answer one AdmissionReview (see the module docstring)."""
        body = await self._body(request)
        if isinstance(body, web.Response):
            self.counters.errors += 1
            log.warning("review rejected", extra={"status": body.status, "peer": request.remote})
            return body
        try:
            review = mutating.decode_review(body)
            outcome = mutating.decide(review, settings=self.settings)
        except mutating.ReviewError as exc:
            self.counters.errors += 1
            log.warning("malformed review", extra={"error": str(exc), "peer": request.remote})
            return _error(400, str(exc))
        except Exception as exc:  # a bug in the decision must not end the server
            self.counters.errors += 1
            log.exception("review failed", extra={"peer": request.remote})
            return _error(500, f"internal error: {type(exc).__name__}")
        setattr(self.counters, outcome.verdict, getattr(self.counters, outcome.verdict) + 1)
        extra: dict[str, Any] = {
            "uid": outcome.uid,
            "pod": outcome.pod,
            "verdict": outcome.verdict,
            "reason": outcome.message,
            "dry_run": bool(review.request and review.request.dry_run),
        }
        if outcome.patch:
            extra["patch"] = _ENCODER.encode(list(outcome.patch)).decode()
        log.log(
            logging.WARNING if outcome.verdict == "denied" else logging.INFO,
            outcome.verdict,
            extra=extra,
        )
        return web.Response(body=_ENCODER.encode(outcome.to_review()), content_type=JSON)


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """A TLS server context (TLS 1.2 or later) holding ``cert`` (PEM chain) and ``key``.

    Raises ``OSError`` for a missing file, ``ssl.SSLError`` for a key that does not match
    or PEM that does not parse.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


def _stamp(*paths: str) -> tuple[tuple[int, int], ...]:
    out = []
    for p in paths:
        st = os.stat(p)  # follows the Secret volume's ..data symlink
        out.append((st.st_mtime_ns, st.st_ino))
    return tuple(out)


@dataclass
class Server:
    """The webhook served over HTTPS on ``host``:``port`` (0: a free port).

    ``start`` returns the bound port; ``stop`` marks it not ready and closes it.
    """

    webhook: Webhook
    cert: str
    key: str
    host: str = "0.0.0.0"
    port: int = 0
    reload_s: float = 60.0
    reloads: int = 0
    _runner: web.AppRunner | None = None
    _context: ssl.SSLContext | None = None
    _watch: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Load the certificate and listen; returns the port.

        Raises ``OSError``/``ssl.SSLError`` as ``server_context`` does, or ``OSError`` when
        the port is taken.
        """
        self._context = server_context(self.cert, self.key)
        stamp = _stamp(self.cert, self.key)
        self._runner = web.AppRunner(self.webhook.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self._context)
        await site.start()
        port = int(self._runner.addresses[0][1])
        self._watch = asyncio.create_task(self._reload_loop(stamp), name="tls-reload")
        self.webhook.ready = True
        log.info("webhook serving", extra={"host": self.host, "port": port})
        return port

    async def _reload_loop(self, stamp: tuple[tuple[int, int], ...]) -> None:
        assert self._context is not None
        while True:
            await asyncio.sleep(self.reload_s)
            try:
                now = _stamp(self.cert, self.key)
                if now == stamp:
                    continue
                # Check the pair in a fresh context first: a failed load into the live
                # one could leave it holding a new certificate with the old key.
                server_context(self.cert, self.key)
                self._context.load_cert_chain(self.cert, self.key)
            except (OSError, ssl.SSLError) as exc:
                log.warning("certificate not reloaded", extra={"error": str(exc)})
                continue
            stamp = now
            self.reloads += 1
            log.info("certificate reloaded", extra={"cert": self.cert})

    async def stop(self) -> None:
        """Not ready, then closed (idempotent)."""
        self.webhook.ready = False
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            log.info("webhook stopped", extra={"counters": vars(self.webhook.counters)})
