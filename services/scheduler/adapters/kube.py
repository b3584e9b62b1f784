"""The scheduler's Kubernetes side: the pod watch, the reservation sweeper, restart
recovery, and the binder behind the extender's ``/bind``.

A ``Kube`` keeps every pod of the cluster (``PodState``) from a list and a watch
(kubernetes-asyncio). It acts on the decisions of ``services.scheduler.core.extending``:

- a pod that ends (phase Succeeded or Failed) or is deleted frees its slices at once;
- every ``sweep_s`` seconds ``reconcile`` runs: a reservation whose pod is still unbound
  ``ttl_s`` seconds after this replica first saw it is released (a replica that restarts
  starts its timers again, so a reservation lives at most twice the TTL), a bound pod the
  ledger lost is restored from its annotations, and a pod whose allocation annotation
  cannot be decoded is reported -- a log line, the ``undecodable`` counter and a Warning
  Event on the pod -- and its node held (HAMi #2958);
- on start, and whenever the watch has to start over, the pods are listed and the same
  reconcile runs with the list as the truth: a ledger pod missing from it is freed;
- scheduling Events (``record``: HAMi's FilteringFailed / FilteringSucceed /
  BindingSucceed / BindingFailed, ``core.recording``) are written by a background task,
  so a filter or bind answer never waits on them: core/v1 Events, as HAMi's client-go
  recorder writes them (``CoreV1().Events``), whose ``count``, ``firstTimestamp`` and
  ``lastTimestamp`` ``kubectl describe pod`` shows as "(x12 over 3m)"; repeats are folded
  into that count and written at most once per ``events_interval_s``
  (``recording.Recorder``). An Event the API refuses is logged and counted, never raised.

The ledger is changed only through the replica's compare-and-set commits
(``Replica.schedule`` / ``release`` / ``adopt``), so any number of replicas can run all of
this at once: the second release of a pod finds nothing to free.

What it leaves to others: the decisions (``core.extending``), the HTTP server
(``adapters.extender``), building the API client (``libshared.kubeclients``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException

from libshared import events
from libshared.errors import InvalidRequest, VsliceError
from libshared.resources import ResourceSettings, parse_pod
from services.scheduler.adapters import bus, decisions
from services.scheduler.core import extending, recording

log = logging.getLogger("vslice.scheduler.kube")

COMPONENT = "vslice-scheduler"
WATCH_BACKOFF_S = 1.0  # pause before listing again after the watch failed
EVENT_QUEUE = 1024  # Event writes waiting for the API; more are dropped and counted
_JSON = msgspec.json.Decoder()


class KubeStats(msgspec.Struct, kw_only=True):
    """Counters of one replica's Kubernetes side since it started: pods ``bound`` and
    ``bind_errors``; slices released because the pod ``ended``, was ``deleted``, is
    ``gone`` from the API, or its reservation ``expired`` (TTL); placements ``restored``
    from annotations; ``undecodable`` annotations reported; ``held_nodes`` now (a gauge);
    ``relists`` of the pods; scheduling Events ``events_written`` (creates and count
    patches), ``events_failed`` (refused or unanswered), ``events_dropped`` (queue full)."""

    bound: int = 0
    bind_errors: int = 0
    ended: int = 0
    deleted: int = 0
    gone: int = 0
    expired: int = 0
    restored: int = 0
    undecodable: int = 0
    held_nodes: int = 0
    relists: int = 0
    events_written: int = 0
    events_failed: int = 0
    events_dropped: int = 0


class BindError(VsliceError):
    """A bind that did not happen: the message goes to kube-scheduler as the
    ``ExtenderBindingResult.Error``."""


def _api_error(exc: ApiException) -> str:
    body = exc.body.decode(errors="replace") if isinstance(exc.body, bytes) else exc.body
    try:
        message = _JSON.decode(body or b"{}").get("message") if body else None
    except (msgspec.DecodeError, AttributeError):
        message = None
    return f"API server answered {exc.status} {exc.reason}: {message or body or ''}".strip()


@dataclass
class Kube:
    """The Kubernetes side of one replica (see the module docstring).

    ``api``: an open ``ApiClient`` (the caller closes it); ``replica``: the bus replica
    whose view and commits are used; ``ttl_s``: reservation TTL, seconds; ``sweep_s``:
    seconds between reconciles (default: a quarter of the TTL, 0.1-5 s);
    ``request_timeout_s``: timeout of one API request, seconds; ``events_interval_s``:
    the least time between two writes of one Event's count, seconds (``recorder``);
    ``resources``: the resource model's defaults a pod is parsed with at bind.
    """

    api: client.ApiClient
    replica: bus.Replica
    ttl_s: float = 60.0
    sweep_s: float | None = None
    request_timeout_s: float = 10.0
    events_interval_s: float = 30.0
    resources: ResourceSettings = field(default_factory=ResourceSettings)
    recorder: recording.Recorder = field(init=False)
    pods: dict[str, extending.PodState] = field(default_factory=dict)
    holds: dict[str, extending.Hold] = field(default_factory=dict)
    stats: KubeStats = field(default_factory=KubeStats)
    _v1: client.CoreV1Api = field(init=False)
    # The same API, untyped: kubernetes-asyncio's stubs type the decoded models, not the
    # raw answers of ``_preload_content=False`` nor dict bodies and ``_content_type``.
    _raw: Any = field(init=False)
    _resource_version: str | None = field(init=False, default=None)
    _unbound_since: dict[str, float] = field(init=False, default_factory=dict)
    _busy: set[str] = field(init=False, default_factory=set)
    _reported: set[str] = field(init=False, default_factory=set)
    _tasks: list[asyncio.Task[None]] = field(init=False, default_factory=list)
    _releases: set[asyncio.Task[None]] = field(init=False, default_factory=set)
    _reconciling: asyncio.Lock = field(init=False, default_factory=asyncio.Lock)
    _events: asyncio.Queue[recording.Action] = field(init=False)

    def __post_init__(self) -> None:
        self._v1 = client.CoreV1Api(self.api)
        self._raw = self._v1
        self.recorder = recording.Recorder(interval_s=self.events_interval_s)
        self._events = asyncio.Queue(maxsize=EVENT_QUEUE)
        if self.sweep_s is None:
            self.sweep_s = min(5.0, max(0.1, self.ttl_s / 4))

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """List the pods and reconcile the ledger with them (restart recovery), then watch
        and sweep in the background. Raises ``ApiException`` / ``aiohttp.ClientError``
        when the first list fails."""
        await self._relist()
        self._tasks = [
            asyncio.create_task(self._watch_loop(), name="vslice-pod-watch"),
            asyncio.create_task(self._sweep_loop(), name="vslice-sweeper"),
            asyncio.create_task(self._event_loop(), name="vslice-events"),
            asyncio.create_task(self._flush_loop(), name="vslice-event-counts"),
        ]

    async def stop(self) -> None:
        """Stop watching, sweeping and writing Events; wait for releases in flight."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._releases:
            await asyncio.gather(*self._releases, return_exceptions=True)

    # -- what the extender asks --------------------------------------------------------

    def held_nodes(self) -> dict[str, str]:
        """Nodes offered to no pod, with the reason (a pod's undecodable annotation)."""
        return {h.pod.node: extending.held_reason(h) for h in self.holds.values()}

    def note_reserved(self, pod_uid: str) -> None:
        """Start ``pod_uid``'s TTL timer now (the extender just reserved it)."""
        self._unbound_since.setdefault(pod_uid, time.monotonic())

    # -- scheduling Events -------------------------------------------------------------

    def record(self, pod: recording.PodRef, notes: list[recording.Note]) -> None:
        """Record ``notes`` as Events on ``pod`` (written in the background, rate-limited
        by ``recorder``). Never waits and never raises."""
        for action in self.recorder.observe(pod, notes, now=time.time()):
            try:
                self._events.put_nowait(action)
            except asyncio.QueueFull:
                self.stats.events_dropped += 1
                self.recorder.lost(action)

    async def _event_loop(self) -> None:
        while True:
            await self._write_event(await self._events.get())

    async def _flush_loop(self) -> None:
        # a plain sleep: asyncio.wait_for on the queue can swallow a cancellation on
        # Python 3.11 (CPython gh-86296), and stop() would then wait for ever
        while True:
            await asyncio.sleep(min(1.0, self.events_interval_s))
            for patch in self.recorder.flush(now=time.time()):
                try:
                    self._events.put_nowait(patch)
                except asyncio.QueueFull:
                    self.stats.events_dropped += 1
                    self.recorder.lost(patch)

    async def _write_event(self, action: recording.Action) -> None:
        try:
            if isinstance(action, recording.Create):
                pod, note = action.pod, action.note
                at = _timestamp(action.at_s)
                body = {
                    "apiVersion": "v1",
                    "kind": "Event",
                    "metadata": {"name": action.name, "namespace": pod.namespace},
                    "involvedObject": {
                        "apiVersion": "v1",
                        "kind": "Pod",
                        "name": pod.name,
                        "namespace": pod.namespace,
                        "uid": pod.uid,
                    },
                    "reason": note.reason,
                    "message": note.message,
                    "type": note.type,
                    "source": {"component": COMPONENT},
                    "reportingComponent": COMPONENT,
                    "reportingInstance": self.replica.name,
                    "firstTimestamp": at,
                    "lastTimestamp": at,
                    "count": 1,
                }
                resp = await self._raw.create_namespaced_event(
                    pod.namespace,
                    body,
                    _preload_content=False,
                    _request_timeout=self.request_timeout_s,
                )
            else:
                resp = await self._raw.patch_namespaced_event(
                    action.name,
                    action.namespace,
                    {"count": action.count, "lastTimestamp": _timestamp(action.last_s)},
                    _content_type="application/merge-patch+json",
                    _preload_content=False,
                    _request_timeout=self.request_timeout_s,
                )
            await self._read(resp)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # an Event is never worth more than a log line
            self.stats.events_failed += 1
            self.recorder.lost(action)
            log.warning("event not recorded", extra={"event": action.name, "error": str(exc)})
            return
        self.stats.events_written += 1

    # -- listing and watching ----------------------------------------------------------

    async def _relist(self) -> None:
        # The ledger is read before the list: a pod reserved after this point is in the
        # ledger but may be missing from the list, and must not be freed as gone.
        ledger = self._ledger_pods()
        resp = await self._raw.list_pod_for_all_namespaces(
            _preload_content=False, _request_timeout=self.request_timeout_s
        )
        body = await self._read(resp)
        pods: dict[str, extending.PodState] = {}
        for obj in body.get("items") or []:
            try:
                state = extending.pod_state(obj)
            except ValueError as exc:
                log.warning("pod without uid in the list", extra={"error": str(exc)})
                continue
            pods[state.uid] = state
        self.pods = pods
        self._resource_version = (body.get("metadata") or {}).get("resourceVersion")
        self.stats.relists += 1
        await self.reconcile(listed=True, ledger=ledger)

    @staticmethod
    async def _read(resp: aiohttp.ClientResponse) -> dict[str, Any]:
        async with resp:
            data = await resp.read()
            if not 200 <= resp.status <= 299:
                raise ApiException(status=resp.status, reason=data.decode(errors="replace"))
        body = _JSON.decode(data)
        if not isinstance(body, dict):
            raise ApiException(status=resp.status, reason="the answer is not a JSON object")
        return body

    async def _watch_loop(self) -> None:
        while True:
            try:
                # return_type "object": events stay plain JSON (no V1Pod models to build)
                async with watch.Watch(return_type="object") as w:
                    stream = w.stream(
                        self._v1.list_pod_for_all_namespaces,
                        resource_version=self._resource_version,
                        allow_watch_bookmarks=True,
                    )
                    async for event in stream:
                        self._on_event(str(event.get("type")), event.get("raw_object"))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: list again, so nothing is missed
                log.warning("pod watch failed; listing again", extra={"error": str(exc)})
            await asyncio.sleep(WATCH_BACKOFF_S)
            try:
                await self._relist()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("pod list failed", extra={"error": str(exc)})

    def _on_event(self, kind: str, obj: object) -> None:
        if kind not in ("ADDED", "MODIFIED", "DELETED") or not isinstance(obj, dict):
            return
        try:
            state = extending.pod_state(obj)
        except ValueError as exc:
            log.warning("pod event without uid", extra={"error": str(exc)})
            return
        meta = obj.get("metadata") or {}
        if isinstance(meta, dict) and meta.get("resourceVersion"):
            self._resource_version = str(meta["resourceVersion"])
        if kind == "DELETED":
            self.pods.pop(state.uid, None)
            self.recorder.forget(state.uid)
            self._drop_hold(state.uid)
            self._spawn_release(state.uid, "pod deleted", "deleted")
            return
        self.pods[state.uid] = state
        if state.ended:
            self._drop_hold(state.uid)
            self._spawn_release(state.uid, f"pod {state.phase}", "ended")

    def _drop_hold(self, pod_uid: str) -> None:
        if self.holds.pop(pod_uid, None) is not None:
            self.stats.held_nodes = len({h.pod.node for h in self.holds.values()})
            log.info("hold lifted: the pod ended", extra={"pod_uid": pod_uid})

    def _spawn_release(self, pod_uid: str, reason: str, counter: str) -> None:
        if not extending.kubernetes_uid(pod_uid):
            return
        if self.replica.node_of(pod_uid) is None:
            return
        task = asyncio.create_task(self._release(pod_uid, reason, counter))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release(self, pod_uid: str, reason: str, counter: str) -> None:
        decisions.taking(pod_uid)
        try:
            # an expired reservation's pod may be placed again: no tombstone for it
            ack = await self.replica.release(pod_uid, final=counter != "expired")
        except Exception as exc:  # retried by the next sweep
            log.warning("release failed", extra={"pod_uid": pod_uid, "error": str(exc)})
            return
        self._unbound_since.pop(pod_uid, None)
        decisions.released(ack, replica=self.replica.name)
        if ack.node is not None:
            setattr(self.stats, counter, getattr(self.stats, counter) + 1)
            log.info(
                "slices released",
                extra={"pod_uid": pod_uid, "node": ack.node, "slices": ack.slices, "why": reason},
            )

    # -- reconciling -------------------------------------------------------------------

    def _ledger_pods(self) -> dict[str, str]:
        return self.replica.ledger_pods()

    async def _sweep_loop(self) -> None:
        assert self.sweep_s is not None
        while True:
            await asyncio.sleep(self.sweep_s)
            try:
                await self.reconcile(listed=False)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reconcile failed")

    async def reconcile(self, *, listed: bool, ledger: dict[str, str] | None = None) -> None:
        """Run ``extending.reconcile`` over the pods and the ledger view and act on it.

        ``listed``: the pods were just listed (a ledger pod missing from them is freed at
        once); ``ledger``: the ledger's pods as read before that list (default: now).
        """
        async with self._reconciling:
            plan = extending.reconcile(
                pods=self.pods,
                ledger=self._ledger_pods() if ledger is None else ledger,
                registrations={reg.node: reg for reg in self.replica.registrations()},
                unbound_since=self._unbound_since,
                now=time.monotonic(),
                ttl_s=self.ttl_s,
                listed=listed,
                busy=set(self._busy),
            )
            self._unbound_since = plan.unbound_since
            for release in plan.releases:
                await self._release(release.pod_uid, release.reason, release.cause)
            for placement in plan.restores:
                await self._restore(placement)
            self.holds = {h.pod.uid: h for h in plan.holds}
            self.stats.held_nodes = len({h.pod.node for h in plan.holds})
            for hold in plan.holds:
                await self._report(hold.pod, hold.error, held=True)
            for bad in plan.undecodable:
                await self._report(bad.pod, bad.error, held=False)
            for state in plan.waiting:
                if state.uid not in self._reported:
                    self._reported.add(state.uid)
                    log.warning(
                        "bound pod on a node with no devices registered; restored once it does",
                        extra={"pod": f"{state.namespace}/{state.name}", "node": state.node},
                    )

    async def _restore(self, placement: events.Placement) -> None:
        where = {"pod": f"{placement.namespace}/{placement.pod}", "node": placement.node}
        if self.replica.node_of(placement.pod_uid) is not None:
            return  # committed since the ledger was read: nothing lost
        try:
            held = await self.replica.adopt(placement)
        except Exception as exc:  # retried by the next sweep
            log.warning("restore failed", extra={**where, "error": str(exc)})
            return
        if not held:
            log.error("bound pod holds slices on another node than its annotation", extra=where)
            return
        self.stats.restored += 1
        log.warning("restored a bound pod's slices from its annotations", extra=where)

    async def _report(self, state: extending.PodState, error: str, *, held: bool) -> None:
        """Log, count and record an Event for a pod's undecodable annotation (once per pod
        and replica)."""
        if state.uid in self._reported:
            return
        self._reported.add(state.uid)
        self.stats.undecodable += 1
        what = "node held" if held else "slices kept in the ledger"
        log.error(
            "undecodable allocation annotation; capacity held",
            extra={"pod": f"{state.namespace}/{state.name}", "node": state.node, "error": error},
        )
        now = datetime.datetime.now(tz=datetime.UTC).isoformat(timespec="seconds")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{state.name}.{uuid.uuid4().hex[:16]}"},
            "involvedObject": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": state.name,
                "namespace": state.namespace,
                "uid": state.uid,
            },
            "reason": extending.UNDECODABLE,
            "message": f"{error}; {what}",
            "type": "Warning",
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "reportingInstance": self.replica.name,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self._raw.create_namespaced_event(
                state.namespace, body, _request_timeout=self.request_timeout_s
            )
        except (ApiException, aiohttp.ClientError, TimeoutError) as exc:
            log.warning("event not recorded", extra={"pod_uid": state.uid, "error": str(exc)})

    # -- binding -----------------------------------------------------------------------

    async def bind(self, args: extending.BindingArgs) -> str:
        """Bind the pod to ``args.node``: reserve its slices there if it holds none (the
        TTL may have freed them), write HAMi's annotations, create the Binding.

        Returns ``""`` when bound (also when it already was, to that node), else the error
        for kube-scheduler; a failed bind releases the pod's slices.
        """
        ref = recording.PodRef(uid=args.pod_uid, namespace=args.pod_namespace, name=args.pod_name)
        self._busy.add(args.pod_uid)
        try:
            await self._bind(args)
        except BindError as exc:
            self.stats.bind_errors += 1
            log.warning(
                "bind failed",
                extra={"pod": f"{args.pod_namespace}/{args.pod_name}", "error": str(exc)},
            )
            self.record(ref, [recording.binding_failed(str(exc))])
            return str(exc)
        finally:
            self._busy.discard(args.pod_uid)
        self.stats.bound += 1
        self.record(ref, [recording.binding_succeed(args.node, ref)])
        return ""

    async def _bind(self, args: extending.BindingArgs) -> None:
        where = f"pod {args.pod_namespace}/{args.pod_name}"
        state = await self._pod(args, fresh=False)
        if state.uid != args.pod_uid:
            # the pod of this UID is gone (its name holds another): its reservation goes
            # now, not when the watch reports the deletion
            await self._release(args.pod_uid, "pod recreated before its bind", "deleted")
            raise BindError(f"{where} has UID {state.uid}, not {args.pod_uid} (recreated?)")
        if state.bound:
            if state.node == args.node:
                return
            raise BindError(f"{where} is already bound to node {state.node}")
        try:
            request = parse_pod(state.raw, settings=self.resources)
        except InvalidRequest as exc:
            raise BindError(f"{where}: {exc}") from exc
        if not request.gpu_containers:
            await self._create_binding(args)
            return
        held = self.replica.placement_of(args.pod_uid)
        decision: events.Placement | events.Unschedulable
        if held is not None and held.node == args.node:
            decision = held  # the reservation, no I/O
        else:
            try:
                decision = await self.replica.schedule(request, nodes=[args.node])
            except Exception as exc:
                raise BindError(f"{where}: no reservation on node {args.node}: {exc}") from exc
        if isinstance(decision, events.Unschedulable):
            raise BindError(f"{where} does not fit node {args.node}: {decision.reason}")
        if decision.node != args.node:
            await self._release(args.pod_uid, "bind asked for another node", "expired")
            raise BindError(
                f"{where} held slices on node {decision.node}, not {args.node}: released,"
                " schedule it again"
            )
        try:
            annotations = extending.bind_annotations(
                decision, containers=len(state.containers), now_s=time.time()
            )
            await self._raw.patch_namespaced_pod(
                args.pod_name,
                args.pod_namespace,
                {"metadata": {"uid": args.pod_uid, "annotations": annotations}},
                _content_type="application/merge-patch+json",
                _request_timeout=self.request_timeout_s,
            )
            await self._create_binding(args)
        except (BindError, ApiException, aiohttp.ClientError, TimeoutError, ValueError) as exc:
            await self._release(args.pod_uid, "bind failed", "expired")
            message = _api_error(exc) if isinstance(exc, ApiException) else str(exc)
            raise BindError(f"{where} on node {args.node}: {message}") from exc
        if self.replica.node_of(args.pod_uid) is None:
            # released by a sweeper racing this bind: the pod runs on these slices now
            await self._restore(decision)

    async def _pod(self, args: extending.BindingArgs, *, fresh: bool) -> extending.PodState:
        """The pod named by ``args``: from the watch unless ``fresh``, else read. Raises
        ``BindError`` when it cannot be read."""
        state = None if fresh else self.pods.get(args.pod_uid)
        if state is not None and (state.namespace, state.name) == (
            args.pod_namespace,
            args.pod_name,
        ):
            return state
        where = f"pod {args.pod_namespace}/{args.pod_name}"
        try:
            resp = await self._raw.read_namespaced_pod(
                args.pod_name,
                args.pod_namespace,
                _preload_content=False,
                _request_timeout=self.request_timeout_s,
            )
            return extending.pod_state(await self._read(resp))
        except ApiException as exc:
            raise BindError(f"{where}: {_api_error(exc)}") from exc
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise BindError(f"{where}: {exc}") from exc

    async def _create_binding(self, args: extending.BindingArgs) -> None:
        """Create the pod's Binding; a 409 for a pod already bound to ``args.node`` is
        success. Raises ``BindError`` otherwise."""
        where = f"pod {args.pod_namespace}/{args.pod_name}"
        body = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {
                "name": args.pod_name,
                "namespace": args.pod_namespace,
                "uid": args.pod_uid,
            },
            "target": {"apiVersion": "v1", "kind": "Node", "name": args.node},
        }
        try:
            # The API server answers a Status, which kubernetes-asyncio cannot read as the
            # V1Binding it expects: the raw answer is checked here instead.
            resp = await self._raw.create_namespaced_pod_binding(
                args.pod_name,
                args.pod_namespace,
                body,
                _preload_content=False,
                _request_timeout=self.request_timeout_s,
            )
            await self._read(resp)
        except ApiException as exc:
            if exc.status != 409:
                raise BindError(f"{where}: Binding: {_api_error(exc)}") from exc
            current = await self._pod(args, fresh=True)
            if current.node != args.node:
                raise BindError(
                    f"{where} is bound to node {current.node or '(none)'}: {_api_error(exc)}"
                ) from exc
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise BindError(f"{where}: Binding: {exc}") from exc


def _timestamp(at_s: float) -> str:
    """RFC 3339 in seconds, UTC, as the API server writes Event timestamps."""
    return datetime.datetime.fromtimestamp(at_s, tz=datetime.UTC).isoformat(timespec="seconds")
