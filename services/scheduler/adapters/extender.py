"""The kube-scheduler extender over HTTP(S) (aiohttp): ``/filter``, ``/bind``, health.

kube-scheduler (its ``extenders`` configuration with ``filterVerb: filter``,
``bindVerb: bind`` and ``nodeCacheCapable: true``) posts ``ExtenderArgs`` to ``/filter``
and ``ExtenderBindingArgs`` to ``/bind``; the types and their JSON are in
``services.scheduler.core.extending``.

``/filter`` decides with the core among the candidate nodes and reserves the pod's slices
by the same compare-and-set commit on the ledger as a schedule request on the bus
(``Replica.schedule``), so bus replicas and extender replicas never book the same memory.
It answers exactly one node, with HAMi's reason for each candidate that does not fit; a
pod that already holds slices gets the same node again. ``/bind`` is ``Kube.bind``. A
body that is not what kube-scheduler sends gets a 400 naming the field and value; an
error while deciding is answered in the result's ``Error`` (kube-scheduler retries).

What it leaves to others: the decisions (``core``), the ledger commits (``adapters.bus``),
the API server (``adapters.kube``), wiring (``app``).
"""

from __future__ import annotations

import dataclasses
import logging
import ssl

import msgspec
from aiohttp import web

from libshared import events
from libshared.errors import InvalidRequest
from libshared.resources import ResourceSettings, parse_pod
from services.scheduler.adapters import bus, decisions
from services.scheduler.adapters.kube import Kube
from services.scheduler.core import extending, recording

log = logging.getLogger("vslice.scheduler.extender")

MAX_BODY_BYTES = 32 * 2**20  # a NodeList of a few thousand nodes (without nodeCacheCapable)
JSON = "application/json"


class ExtenderStats(msgspec.Struct, kw_only=True):
    """Counters of one replica's extender: ``filters`` answered, pods ``reserved``,
    ``unschedulable`` answers, ``binds`` asked, ``bad_bodies`` (400s), ``errors``."""

    filters: int = 0
    reserved: int = 0
    unschedulable: int = 0
    binds: int = 0
    bad_bodies: int = 0
    errors: int = 0


def _json(body: msgspec.Struct | dict[str, object], *, status: int = 200) -> web.Response:
    return web.Response(body=extending.ENCODER.encode(body), status=status, content_type=JSON)


class Extender:
    """The HTTP routes of one replica. ``kube`` is None without ``--kube``: ``/filter``
    still reserves, ``/bind`` answers an error. ``ready`` is set by the wiring once
    recovery is done (``/readyz`` says 503 before). A body over ``max_body_bytes`` gets
    a 413. ``resources``: the resource model's defaults the pods are parsed with."""

    def __init__(
        self,
        *,
        replica: bus.Replica,
        kube: Kube | None,
        max_body_bytes: int = MAX_BODY_BYTES,
        resources: ResourceSettings | None = None,
    ) -> None:
        self.replica = replica
        self.resources = resources or ResourceSettings()
        self.kube = kube
        self.ready = False
        self.stats = ExtenderStats()
        self.app = web.Application(client_max_size=max_body_bytes)
        self.app.add_routes(
            [
                web.post("/filter", self.on_filter),
                web.post("/bind", self.on_bind),
                web.get("/healthz", self.on_healthz),
                web.get("/readyz", self.on_readyz),
                web.get("/stats", self.on_stats),
            ]
        )

    # -- routes -----------------------------------------------------------------------

    async def on_filter(self, request: web.Request) -> web.Response:
        """``ExtenderArgs`` in, ``ExtenderFilterResult`` out (400 for a bad body)."""
        body = await request.read()
        try:
            args = extending.decode_filter_args(body)
        except extending.BadBody as exc:
            self.stats.bad_bodies += 1
            log.warning("bad filter body", extra={"error": str(exc)})
            return _json(
                extending.ExtenderFilterResult(error=f"bad ExtenderArgs: {exc}"), status=400
            )
        self.stats.filters += 1
        try:
            result = await self.filter(args)
        except Exception as exc:  # answered, never a crash: kube-scheduler retries the pod
            self.stats.errors += 1
            log.exception("filter failed", extra={"pod_uid": args.uid})
            result = extending.ExtenderFilterResult(error=f"filter failed: {exc}")
            self._record(args, [recording.filtering_error(result.error or "")])
        return _json(result)

    async def on_bind(self, request: web.Request) -> web.Response:
        """``ExtenderBindingArgs`` in, ``ExtenderBindingResult`` out (400 for a bad body)."""
        body = await request.read()
        try:
            args = extending.decode_binding_args(body)
        except extending.BadBody as exc:
            self.stats.bad_bodies += 1
            log.warning("bad bind body", extra={"error": str(exc)})
            return _json(
                extending.ExtenderBindingResult(error=f"bad ExtenderBindingArgs: {exc}"), status=400
            )
        self.stats.binds += 1
        if self.kube is None:
            error = "this replica does not talk to the API server (start it with --kube)"
        else:
            try:
                error = await self.kube.bind(args)
            except Exception as exc:  # answered, never a crash
                self.stats.errors += 1
                log.exception("bind failed", extra={"pod_uid": args.pod_uid})
                error = f"bind failed: {exc}"
                ref = recording.PodRef(
                    uid=args.pod_uid, namespace=args.pod_namespace, name=args.pod_name
                )
                self.kube.record(ref, [recording.binding_failed(error)])
        return _json(extending.ExtenderBindingResult(error=error))

    async def on_healthz(self, request: web.Request) -> web.Response:
        """200 while the process serves."""
        return web.Response(text="ok")

    async def on_readyz(self, request: web.Request) -> web.Response:
        """200 once the view is complete and recovery is done, 503 before."""
        if not self.ready:
            return web.Response(text="recovering", status=503)
        return web.Response(text="ok")

    async def on_stats(self, request: web.Request) -> web.Response:
        """This replica's counters: ``extender``, ``kube`` (when on) and ``bus``."""
        out: dict[str, object] = {
            "extender": msgspec.to_builtins(self.stats),
            "bus": msgspec.to_builtins(self.replica.stats),
        }
        if self.kube is not None:
            out["kube"] = msgspec.to_builtins(self.kube.stats)
            out["events"] = dataclasses.asdict(self.kube.recorder.stats)
        return _json(out)

    def _record(self, args: extending.FilterArgs, notes: list[recording.Note]) -> None:
        if self.kube is not None:
            ref = recording.PodRef(uid=args.uid, namespace=args.namespace, name=args.name)
            self.kube.record(ref, notes)

    # -- the filter -------------------------------------------------------------------

    async def filter(self, args: extending.FilterArgs) -> extending.ExtenderFilterResult:
        """Decide and reserve (see the module docstring). Raises what the replica raises
        (``TemporaryError``, ``Expired``, ``Conflicts``)."""
        try:
            pod = parse_pod(args.pod, settings=self.resources)
        except InvalidRequest as exc:
            self._record(args, [recording.filtering_error(f"InvalidRequest: {exc}")])
            return extending.invalid_request(args, exc)
        if not pod.gpu_containers:
            return extending.pass_through(args)  # HAMi records nothing for such a pod
        decisions.taking(pod.uid, pod)
        held = self.kube.held_nodes() if self.kube is not None else {}
        candidates = [n for n in args.candidates if n not in held]
        current = self.replica.node_of(pod.uid)
        if current is not None and current not in candidates:
            # kube-scheduler no longer offers the node of the pod's reservation
            log.info("reservation off the candidates; placing again", extra={"pod_uid": pod.uid})
            await self.replica.release(pod.uid, final=False)  # the pod is placed again
        # scored before the decision: the message lists each node as it was offered
        scores = self.replica.node_scores(pod, candidates)
        decision: events.Placement | events.Unschedulable
        if candidates:
            decision = await self.replica.schedule(pod, nodes=candidates)
        else:
            decision = events.Unschedulable(pod_uid=pod.uid, reason="no candidate node")
        decisions.scheduled(
            decision, pod=pod, policy=self.replica.policy, replica=self.replica.name
        )
        failed = dict(held)
        failed.update(self.replica.filtered(pod, candidates))
        if isinstance(decision, events.Placement) and decision.node in candidates:
            self.stats.reserved += 1
            if self.kube is not None:
                self.kube.note_reserved(pod.uid)
            fits = {n: s for n, s in scores.items() if n not in failed}
            fits.setdefault(decision.node, scores.get(decision.node, 0.0))
            self._record(
                args,
                [
                    recording.filtering_succeed(
                        decision.node, candidates=len(args.candidates), scores=fits
                    )
                ],
            )
            return extending.filter_result(args, chosen=decision.node, failed=failed)
        self.stats.unschedulable += 1
        if isinstance(decision, events.Placement):
            why = f"the pod holds slices on node {decision.node}, not a candidate"
        else:
            why = decision.reason
        for node in candidates:
            failed.setdefault(node, why)  # e.g. a fitting node lost in ledger races
        self._record(args, recording.filtering_failed(failed, candidates=len(args.candidates)))
        return extending.filter_result(args, chosen=None, failed=failed)


async def serve(
    extender: Extender, *, host: str, port: int, tls: ssl.SSLContext | None = None
) -> tuple[web.AppRunner, int]:
    """Listen on ``host``:``port`` (0: any free port); returns the runner (``cleanup()``
    stops it) and the port. Raises ``OSError`` when the port is taken."""
    runner = web.AppRunner(extender.app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=tls)
    await site.start()
    bound = port
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            bound = int(address[1])
            break
    return runner, bound
