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
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web

from libshared import tlsfiles
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


server_context = tlsfiles.server_context


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
    _runner: web.AppRunner | None = None
    _tls: tlsfiles.ReloadingContext | None = None
    _watch: asyncio.Task[None] | None = None

    @property
    def reloads(self) -> int:
        """How many times the certificate was reloaded."""
        return self._tls.reloads if self._tls is not None else 0

    async def start(self) -> int:
        """Load the certificate and listen; returns the port.

        Raises ``OSError``/``ssl.SSLError`` as ``server_context`` does, or ``OSError`` when
        the port is taken.
        """
        self._tls = tlsfiles.ReloadingContext(cert=self.cert, key=self.key)
        self._runner = web.AppRunner(self.webhook.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self._tls.context)
        await site.start()
        port = int(self._runner.addresses[0][1])
        self._watch = asyncio.create_task(self._tls.watch(self.reload_s), name="tls-reload")
        self.webhook.ready = True
        log.info("webhook serving", extra={"host": self.host, "port": port})
        return port

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
