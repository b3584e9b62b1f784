"""Namespace quotas on the bus: reserve a placement's charge by compare-and-set, read the
limits from Kubernetes ResourceQuotas, keep the charges in step with the ledger.

The ``<prefix>-quotas`` bucket holds one ``NamespaceQuota`` per namespace (its limits and
a charge per pod holding slices there). A replica about to commit a placement first
reserves its charge: it reads the namespace's key, asks ``core.quotas.refusal`` whether it
fits, and writes the value with the charge by ``kv.update(key, value, last=revision)``.
Of two replicas racing for the last slice of a quota only one compare-and-set lands; the
other re-reads, sees the winner's charge and refuses -- HAMi, which counts usage in one
scheduler's memory, has no such guarantee across replicas. A namespace without a key has
no quota: a gate that ``watch``es the bucket's keys skips it without a read (one that does
not reads the key each time). A quota is enforced from the moment the replica's watch
sees its key (its own ``QuotaWatch`` marks it at once); a pod reserved just before is
charged afterwards from the ledger, as are pods placed before the quota. A reservation
whose ledger commit does not follow is taken back (``unreserve``) and a released pod's
charge dropped; a replica that dies in between leaves a charge that ``QuotaUpkeep`` drops
once the pod is in no ledger and holds no claim.

``QuotaWatch`` lists and watches the cluster's ResourceQuotas (kubernetes-asyncio) and
writes each namespace's tightest limits, charging the pods the ledger already holds there.

What it leaves to others: the rules (``services.scheduler.core.quotas``), the schema
(``libshared.quotas``), the ledger commit (``services.scheduler.adapters.bus``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
import nats.errors
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException
from nats.js import JetStreamContext, api
from nats.js.errors import (
    BadRequestError,
    BucketNotFoundError,
    KeyDeletedError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
)
from nats.js.kv import KeyValue

from libshared import kvreads, ledgers, tasks, watching
from libshared import quotas as schema
from libshared.connecting import BusSettings
from libshared.errors import VsliceError
from libshared.events import Placement
from libshared.subjects import pod_key
from services.scheduler.core import protocol
from services.scheduler.core import quotas as rules

log = logging.getLogger("vslice.scheduler.quotas")

WATCH_BACKOFF_S = 1.0  # pause before listing the ResourceQuotas again after a failed watch
MAX_BACKOFF_S = 30.0  # longest pause between failed lists (RBAC without resourcequotas)
_JSON = msgspec.json.Decoder()


class QuotaUnavailable(VsliceError):
    """The namespace's quota could not be read or written: nothing is known about whether
    the pod fits, and the request may be sent again."""


async def open_quotas(
    js: JetStreamContext, settings: BusSettings, *, create: bool, wait_s: float = 10.0
) -> KeyValue:
    """The ``<prefix>-quotas`` bucket; with ``create`` (scheduler and operator identities)
    made when missing (one history entry), else waited for up to ``wait_s`` seconds.

    Raises ``BucketNotFoundError`` when it is still missing then."""
    bucket = settings.subjects.quotas_bucket
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        try:
            return await js.key_value(bucket)
        except BucketNotFoundError:
            if loop.time() >= deadline:
                raise
        if create:
            with contextlib.suppress(BadRequestError):  # created meanwhile by another
                return await js.create_key_value(
                    config=api.KeyValueConfig(bucket=bucket, history=1, replicas=settings.replicas)
                )
        await asyncio.sleep(0.1)


@dataclass
class QuotaGate:
    """Reservations against the namespaces' quotas in ``kv`` (see the module docstring).
    ``max_attempts``: compare-and-set attempts before a reservation is refused as
    temporary. ``reserved`` / ``refused`` / ``conflicts`` count what it did. ``known``:
    the bucket's keys while ``watch`` runs (None before: every reservation reads)."""

    kv: KeyValue
    max_attempts: int = 16
    reserved: int = 0
    refused: int = 0
    conflicts: int = 0
    known: set[str] | None = None
    _task: asyncio.Task[None] | None = field(init=False, default=None)

    async def watch(self, *, timeout_s: float = 30.0) -> None:
        """Follow the bucket's keys in the background (until ``close()``), so that a
        namespace without a quota costs no read; returns once the current keys are
        known. Raises ``TimeoutError`` when they are not read within ``timeout_s``."""
        ready = asyncio.Event()
        self._task = asyncio.create_task(self._follow(ready), name="vslice-quota-keys")
        async with asyncio.timeout(timeout_s):
            await ready.wait()

    async def close(self) -> None:
        """Stop following the keys (every reservation reads again)."""
        if self._task is not None:
            await tasks.stop(self._task)
            self._task = None
        self.known = None

    async def _follow(self, ready: asyncio.Event) -> None:
        while True:
            try:
                await self._follow_once(ready)
            except (nats.errors.Error, TimeoutError) as exc:
                log.warning("quota keys not followed", extra={"error": str(exc)})
            # the watch could not start: every reservation reads until it is followed again
            await asyncio.sleep(WATCH_BACKOFF_S)

    async def _follow_once(self, ready: asyncio.Event) -> None:
        # libshared.watching, not kv.watchall(): the latter's "content read" marker can
        # come before the content on a loaded machine, and a namespace whose key was not
        # read yet would have had its quota skipped (libshared.kvreads)
        keys: set[str] = set()

        def handle(key: str, value: bytes | None, revision: int) -> None:
            if value is None:
                keys.discard(key)
            else:
                keys.add(key)

        loaded = asyncio.Event()
        sub = await watching.watch_kv(self.kv, handle, loaded)
        try:
            await loaded.wait()
            self.known = keys
            ready.set()
            await asyncio.Event().wait()  # until close() cancels the task
        finally:
            self.known = None
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    def _skip(self, namespace: str) -> bool:
        """True when the followed keys show ``namespace`` has no quota value."""
        return self.known is not None and pod_key(namespace) not in self.known

    async def _read(self, namespace: str) -> tuple[schema.NamespaceQuota | None, int]:
        """The namespace's value and its revision; ``(None, 0)`` when it has none.
        Raises ``nats.errors.Error`` / ``TimeoutError`` when the bucket cannot be read,
        ``msgspec.MsgspecError`` when the value does not decode or names another
        namespace."""
        try:
            entry = await self.kv.get(pod_key(namespace))
        except (KeyNotFoundError, KeyDeletedError):
            return None, 0
        if not entry.value:
            return None, 0
        quota = schema.DECODER.decode(entry.value)
        if quota.namespace != namespace:
            raise msgspec.ValidationError(
                f"the value under namespace {namespace!r}'s key names {quota.namespace!r}"
            )
        return quota, entry.revision or 0

    async def reserve(self, placement: Placement) -> str | None:
        """Charge ``placement`` to its namespace's quota; None when it fits (or the
        namespace has no quota), else the reason it is refused: ``ResourceQuotaNotFit:
        ...`` (``core.quotas.refusal``; an undecodable value refuses too). Raises
        ``QuotaUnavailable`` when the bucket cannot be read or written, or every
        compare-and-set was lost (a write whose outcome is unknown may have landed: the
        upkeep drops it if the pod never commits)."""
        ns = placement.namespace
        if self._skip(ns):
            return None
        charge = rules.placement_charge(placement)
        for _ in range(self.max_attempts):
            try:
                quota, revision = await self._read(ns)
            except (nats.errors.Error, TimeoutError) as exc:
                raise QuotaUnavailable(f"quota of namespace {ns} unreadable: {exc}") from exc
            except msgspec.MsgspecError as exc:
                log.error("bad quota value", extra={"namespace": ns, "error": str(exc)})
                self.refused += 1
                return f"{rules.NOT_FIT}: namespace {ns}: its quota value does not decode: {exc}"
            if quota is None:
                return None
            why = rules.refusal(quota, charge)
            if why is not None:
                self.refused += 1
                return why
            if quota.charge_of(charge.pod_uid) == charge:
                self.reserved += 1
                return None
            try:
                new = rules.charged(quota, charge)
            except ValueError as exc:
                self.refused += 1
                return f"{rules.NOT_FIT}: {exc}"
            try:
                await self.kv.update(pod_key(ns), schema.ENCODER.encode(new), last=revision)
            except KeyWrongLastSequenceError:
                self.conflicts += 1
                continue
            except (nats.errors.Error, TimeoutError) as exc:
                raise QuotaUnavailable(f"quota of namespace {ns} not written: {exc}") from exc
            self.reserved += 1
            return None
        raise QuotaUnavailable(f"quota of namespace {ns}: {self.max_attempts} races lost")

    async def unreserve(self, namespace: str, pod_uid: str) -> None:
        """Drop ``pod_uid``'s charge from ``namespace``'s quota, if it has one. Never
        raises: a failure is logged and left to ``QuotaUpkeep``."""
        if self._skip(namespace):
            return
        for _ in range(self.max_attempts):
            try:
                quota, revision = await self._read(namespace)
                if quota is None:
                    return
                new = rules.uncharged(quota, pod_uid)
                if new is None:
                    return
                await self.kv.update(pod_key(namespace), schema.ENCODER.encode(new), last=revision)
                return
            except KeyWrongLastSequenceError:
                self.conflicts += 1
            except (nats.errors.Error, TimeoutError, msgspec.MsgspecError) as exc:
                log.warning(
                    "quota charge not dropped",
                    extra={"namespace": namespace, "pod_uid": pod_uid, "error": str(exc)},
                )
                return

    async def set_limits(
        self,
        namespace: str,
        limits: rules.Limits,
        placed: Mapping[str, schema.QuotaCharge],
    ) -> bool:
        """Write ``namespace``'s limits (``placed``: its pods in the ledger, charged when
        the value is new to them). True when it changed the value. Raises
        ``nats.errors.Error`` / ``TimeoutError`` when the bucket cannot be written."""
        key = pod_key(namespace)
        for _ in range(self.max_attempts):
            try:
                quota, revision = await self._read(namespace)
            except msgspec.MsgspecError as exc:
                log.error(
                    "bad quota value replaced", extra={"namespace": namespace, "error": str(exc)}
                )
                quota, revision = None, -1
            new = rules.limited(quota, namespace, limits, placed)
            if new is None:
                self._mark(key)
                return False
            try:
                if revision == 0:
                    await self.kv.create(key, schema.ENCODER.encode(new))
                elif revision < 0:
                    await self.kv.put(key, schema.ENCODER.encode(new))
                else:
                    await self.kv.update(key, schema.ENCODER.encode(new), last=revision)
            except KeyWrongLastSequenceError:
                self.conflicts += 1
                continue
            self._mark(key)
            log.info(
                "quota limits",
                extra={
                    "namespace": namespace,
                    "memory_mib": limits.memory_mib,
                    "cores_percent": limits.cores_percent,
                },
            )
            return True
        return False

    def _mark(self, key: str) -> None:
        """Take ``key`` as a quota value's at once (the watch may tell later)."""
        if self.known is not None:
            self.known.add(key)

    async def reconcile(
        self,
        namespace: str,
        placed: Mapping[str, schema.QuotaCharge],
        claimed: Callable[[str], Any],
    ) -> bool:
        """Make ``namespace``'s charges agree with ``placed`` (its pods in the ledger):
        ``core.quotas.reconciled``, ``claimed(pod_uid)`` an awaitable telling whether a
        pod in no ledger holds a claim. True when it changed the value. Raises
        ``nats.errors.Error`` / ``TimeoutError`` when the bucket cannot be read."""
        for _ in range(self.max_attempts):
            try:
                quota, revision = await self._read(namespace)
            except msgspec.MsgspecError:
                return False  # reported by the reservations that meet it
            if quota is None:
                return False
            held = {c.pod_uid for c in quota.charges if c.pod_uid not in placed}
            live = {uid for uid in held if await claimed(uid)}
            new = rules.reconciled(quota, placed=placed, claimed=live)
            if new is None:
                return False
            try:
                await self.kv.update(pod_key(namespace), schema.ENCODER.encode(new), last=revision)
            except KeyWrongLastSequenceError:
                self.conflicts += 1
                continue
            return True
        return False


@dataclass
class QuotaUpkeep:
    """Every ``period_s`` seconds, make every namespace's charges agree with the ledger
    ``ledger_view()`` returns (the replica's view) and the claims in ``claims``."""

    gate: QuotaGate
    claims: KeyValue
    ledger_view: Callable[[], Iterable[ledgers.NodeLedger]]
    period_s: float = 10.0
    fixed: int = 0
    _task: asyncio.Task[None] | None = field(init=False, default=None)

    def start(self) -> None:
        """Run in the background until ``stop()``."""
        self._task = asyncio.create_task(self._loop(), name="vslice-quota-upkeep")

    async def stop(self) -> None:
        """Stop the background task."""
        if self._task is not None:
            await tasks.stop(self._task)

    async def _claimed(self, pod_uid: str) -> bool:
        try:
            entry = await self.claims.get(pod_key(pod_uid))
        except (KeyNotFoundError, KeyDeletedError):
            return False
        # a release's tombstone or a refusal marker holds nothing in flight
        held = protocol.decode_claim(entry.value or b"").kind is protocol.ClaimKind.HELD
        return bool(entry.value) and held

    async def once(self) -> int:
        """One pass over every namespace's value; how many it changed. Raises
        ``nats.errors.Error`` / ``TimeoutError`` when a bucket cannot be read."""
        # not kv.keys(): its consumer would stay on the server 5 minutes (libshared.kvreads)
        keys = list(await kvreads.latest(self.gate.kv, meta_only=True))
        if not keys:
            return 0
        placed = rules.placed_charges(self.ledger_view())
        changed = 0
        for key in keys:
            # keys are pod_key(namespace); the value names its namespace
            try:
                entry = await self.gate.kv.get(key)
                namespace = schema.DECODER.decode(entry.value or b"").namespace
            except (KeyNotFoundError, KeyDeletedError, msgspec.MsgspecError):
                continue
            if await self.gate.reconcile(namespace, placed.get(namespace, {}), self._claimed):
                changed += 1
        self.fixed += changed
        return changed

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.period_s)
            try:
                await self.once()
            except (nats.errors.Error, TimeoutError) as exc:
                log.warning("quota upkeep failed", extra={"error": str(exc)})


@dataclass
class QuotaWatch:
    """The cluster's ResourceQuotas, listed and watched through ``api``, written into
    ``gate`` as each namespace's tightest limits (``ledger_view``: the replica's ledgers,
    whose pods a namespace is charged when it gets its first quota). ``request_timeout_s``:
    one API request's timeout, seconds."""

    api: client.ApiClient
    gate: QuotaGate
    ledger_view: Callable[[], Iterable[ledgers.NodeLedger]]
    request_timeout_s: float = 10.0
    quotas: dict[tuple[str, str], rules.Limits] = field(default_factory=dict)
    _raw: Any = field(init=False)
    _resource_version: str | None = field(init=False, default=None)
    _task: asyncio.Task[None] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        # untyped: kubernetes-asyncio's stubs do not type ``_preload_content=False``
        self._raw = client.CoreV1Api(self.api)

    async def start(self) -> None:
        """List the ResourceQuotas and write every namespace's limits, then watch in the
        background. A list that fails (the API refuses it, the bucket cannot be written)
        is logged and tried again in the background: the limits last written stay in
        force meanwhile, and the replica schedules on."""
        listed = False
        try:
            await self._relist()
            listed = True
        except Exception as exc:  # any failure: the watch loop lists again
            log.warning("quota list failed", extra={"error": str(exc)})
        self._task = asyncio.create_task(self._watch_loop(listed), name="vslice-quota-watch")

    async def stop(self) -> None:
        """Stop watching."""
        if self._task is not None:
            await tasks.stop(self._task)

    async def _relist(self) -> None:
        resp = await self._raw.list_resource_quota_for_all_namespaces(
            _preload_content=False, _request_timeout=self.request_timeout_s
        )
        async with resp:
            data = await resp.read()
            if not 200 <= resp.status <= 299:
                raise ApiException(status=resp.status, reason=data.decode(errors="replace"))
        body = _JSON.decode(data)
        before = {ns for ns, _ in self.quotas}
        self.quotas = {}
        for obj in body.get("items") or []:
            self._take(obj)
        self._resource_version = (body.get("metadata") or {}).get("resourceVersion")
        for ns in sorted(before | {ns for ns, _ in self.quotas}):
            await self._write(ns)

    def _take(self, obj: object, *, deleted: bool = False) -> str | None:
        """Keep ``obj``'s limits (drop them when ``deleted``); its namespace, None for an
        object without namespace and name."""
        if not isinstance(obj, dict):
            return None
        meta = obj.get("metadata") or {}
        ns, name = meta.get("namespace"), meta.get("name")
        if not (isinstance(ns, str) and isinstance(name, str)):
            return None
        if meta.get("resourceVersion"):
            self._resource_version = str(meta["resourceVersion"])
        if deleted:
            self.quotas.pop((ns, name), None)
            return ns
        limits, problems = rules.limits_of(obj)
        for problem in problems:
            log.warning(
                "ResourceQuota value skipped", extra={"quota": f"{ns}/{name}", "error": problem}
            )
        self.quotas[ns, name] = limits
        return ns

    async def _write(self, namespace: str) -> None:
        limits = rules.tightest(lim for (ns, _), lim in self.quotas.items() if ns == namespace)
        placed = rules.placed_charges(self.ledger_view()).get(namespace, {})
        if limits == rules.Limits() and not any(ns == namespace for ns, _ in self.quotas):
            # no quota (left) in the namespace: an existing value keeps counting, no new one
            try:
                await self.gate.kv.get(pod_key(namespace))
            except (KeyNotFoundError, KeyDeletedError):
                return
        await self.gate.set_limits(namespace, limits, placed)

    async def _watch_loop(self, listed: bool) -> None:
        backoff_s = WATCH_BACKOFF_S
        while True:
            if not listed:
                try:
                    await self._relist()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("quota list failed", extra={"error": str(exc)})
                    await asyncio.sleep(backoff_s)
                    backoff_s = min(MAX_BACKOFF_S, backoff_s * 2)
                    continue
                backoff_s = WATCH_BACKOFF_S
            try:
                async with watch.Watch(return_type="object") as w:
                    stream = w.stream(
                        self._raw.list_resource_quota_for_all_namespaces,
                        resource_version=self._resource_version,
                        allow_watch_bookmarks=True,
                    )
                    async for event in stream:
                        kind = str(event.get("type"))
                        if kind not in ("ADDED", "MODIFIED", "DELETED"):
                            continue
                        ns = self._take(event.get("raw_object"), deleted=kind == "DELETED")
                        if ns is not None:
                            await self._write(ns)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: list again, so nothing is missed
                log.warning("quota watch failed; listing again", extra={"error": str(exc)})
            listed = False
            await asyncio.sleep(WATCH_BACKOFF_S)
