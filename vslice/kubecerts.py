"""The Kubernetes certificate Job: vslice's trust material kept in Secrets.

``python -m vslice.kubecerts`` (the Job ``vslice-certs`` in ``k8s/base/vslice/certs.yaml``)
does in a cluster what ``vslice certs`` does into a directory (``vslice.certs``), with
the same library (``libshared.trust``: ``cryptography`` and ``nkeys``, never openssl):

- the CA, Secret ``vslice-ca`` (``kubernetes.io/tls``): kept when it exists and is valid,
  created otherwise. Only this Job reads its key (through the API); no pod mounts it;
- leaf certificates signed by it, each a ``kubernetes.io/tls`` Secret with ``tls.crt``,
  ``tls.key`` and the CA as ``ca.crt``: the webhook's (``vslice-admission-tls``), the
  extender's (``vslice-scheduler-tls``), NATS's (``vslice-nats-tls``, client and route
  connections) and kube-scheduler's client certificate for the extender
  (``vslice-kube-scheduler-client``). Each is issued when missing and renewed when it is
  unreadable, signed by another CA, names other hosts, or expires within
  ``RENEW_WITHIN`` (or always, with ``--renew``);
- one NKEY seed per bus identity (``IDENTITIES``), Secret ``vslice-nkey-<identity>`` key
  ``seed.nk``, created once and kept across runs;
- derived from those: ``vslice-bus-ca`` (``ca.crt`` alone, what NATS clients mount) and
  ``vslice-nats-auth`` (``auth.conf``: nats-server's ``authorization`` block with one
  user per identity public key, ``libshared.trust.authorization``), which nats.conf
  includes;
- the ``caBundle`` of every webhook of the MutatingWebhookConfiguration
  ``vslice-admission``.

``plan`` decides, purely, what to keep, create or renew from the Secrets as they are;
``provision`` reads them, generates what the plan says, writes it and patches the
webhook configuration. Running it again converges: nothing changes when nothing is due.

What it leaves to others: reloading the renewed files (the webhook and the extender do
it themselves, ``libshared.tlsfiles``; NATS through its config reloader sidecar), and
per-node bus identities for node agents (see k8s/README.md, "Trust model").
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import enum
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from libshared import kubeclients, logs, trust
from libshared import permissions as perms
from libshared.errors import VsliceError
from libshared.subjects import DEFAULT_PREFIX, Subjects

log = logging.getLogger("vslice.kubecerts")

NAMESPACE = "vslice-system"
CA_SECRET = "vslice-ca"
BUS_CA_SECRET = "vslice-bus-ca"
AUTH_SECRET = "vslice-nats-auth"
AUTH_KEY = "auth.conf"
SEED_KEY = "seed.nk"
WEBHOOK_CONFIG = "vslice-admission"
NATS_REPLICAS = 3
# Renewed a month before they expire (they last libshared.trust.CERT_DAYS): a Job run
# monthly, or any re-run in that month, renews them with time to spare.
RENEW_WITHIN = datetime.timedelta(days=30)
TLS_TYPE = "kubernetes.io/tls"
LABELS = {"app.kubernetes.io/part-of": "vslice", "app.kubernetes.io/managed-by": "vslice-certs"}


class CertsError(VsliceError):
    """The Job cannot finish: an API call failed or the webhook configuration is missing.
    The message names the object; the Job's retries (``backoffLimit``) run it again."""


@dataclass(frozen=True)
class Leaf:
    """A certificate to keep in Secret ``secret``: ``common_name`` and ``hosts`` (DNS
    names or IP addresses, its subjectAltNames)."""

    secret: str
    common_name: str
    hosts: tuple[str, ...]


@dataclass(frozen=True)
class Identity:
    """A bus identity of ``role`` (``node``: node agents only) whose seed lives in Secret
    ``vslice-nkey-<name>``."""

    name: str
    role: perms.Role
    node: str = ""

    @property
    def secret(self) -> str:
        return f"vslice-nkey-{self.name}"


# One identity per service that uses the bus in Kubernetes (the webhook does not), and
# one for an operator's repairs. The node agents of every node share one identity with
# node ``*``: a static Job cannot hand each node its own (k8s/README.md, "Trust model").
IDENTITIES = (
    Identity("scheduler", perms.Role.SCHEDULER),
    Identity("nodeagent", perms.Role.NODEAGENT, perms.ANY_NODE),
    Identity("metrics", perms.Role.METRICS),
    Identity("operator", perms.Role.OPERATOR),
)


def _service(name: str, namespace: str) -> tuple[str, ...]:
    return (
        f"{name}.{namespace}.svc",
        name,
        f"{name}.{namespace}",
        f"{name}.{namespace}.svc.cluster.local",
    )


def leaves(*, namespace: str = NAMESPACE, nats_replicas: int = NATS_REPLICAS) -> tuple[Leaf, ...]:
    """The leaf certificates of a vslice install in ``namespace`` with ``nats_replicas``
    NATS pods (StatefulSet ``nats``, headless Service ``nats-headless``). Pure.

    The API server calls the webhook at ``<service>.<namespace>.svc`` (Kubernetes,
    "Dynamic Admission Control", service reference); kube-scheduler the extender at its
    urlPrefix; clients NATS at Service ``nats`` and the routes each pod at
    ``nats-<i>.nats-headless`` (nats-server checks a route's certificate against the
    route URL's host). Loopback names serve probes and local tools inside the pods."""
    headless = f"nats-headless.{namespace}.svc"
    nats = (
        *_service("nats", namespace),
        f"*.{headless}",
        f"*.{headless}.cluster.local",
        *(f"nats-{i}.{headless}" for i in range(nats_replicas)),
        "localhost",
        "127.0.0.1",
    )
    return (
        Leaf(
            "vslice-admission-tls",
            f"vslice-admission.{namespace}.svc",
            _service("vslice-admission", namespace),
        ),
        Leaf(
            "vslice-scheduler-tls",
            f"vslice-scheduler.{namespace}.svc",
            (*_service("vslice-scheduler", namespace), "localhost", "127.0.0.1"),
        ),
        Leaf("vslice-nats-tls", f"nats.{namespace}.svc", nats),
        # a client certificate: its name is who kube-scheduler is, not where it listens
        Leaf("vslice-kube-scheduler-client", "vslice-kube-scheduler", ("vslice-kube-scheduler",)),
    )


def secret_names(*, namespace: str = NAMESPACE, nats_replicas: int = NATS_REPLICAS) -> set[str]:
    """Every Secret the Job reads or writes (its Role names exactly these). Pure."""
    names = {CA_SECRET, BUS_CA_SECRET, AUTH_SECRET}
    names |= {leaf.secret for leaf in leaves(namespace=namespace, nats_replicas=nats_replicas)}
    return names | {identity.secret for identity in IDENTITIES}


class Action(enum.StrEnum):
    """What the Job does with one Secret."""

    KEEP = "keep"
    CREATE = "create"
    RENEW = "renew"


@dataclass(frozen=True)
class Step:
    """The ``action`` for Secret ``secret`` and the ``reason`` (for the Job's log)."""

    secret: str
    action: Action
    reason: str


Existing = Mapping[str, Mapping[str, bytes]]


def _load_ca(data: Mapping[str, bytes]) -> x509.Certificate:
    """The CA certificate of a ``vslice-ca`` Secret's data. Raises ``KeyError`` (a key
    missing), ``ValueError`` (unreadable, not a CA, key not the certificate's) or
    ``x509.ExtensionNotFound``."""
    cert = x509.load_pem_x509_certificate(data["tls.crt"])
    key = serialization.load_pem_private_key(data["tls.key"], password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise ValueError("the key is not the certificate's")
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    if not constraints.ca:
        raise ValueError("not a CA certificate")
    return cert


def _ca_step(
    data: Mapping[str, bytes] | None, *, now: datetime.datetime
) -> tuple[Step, x509.Certificate | None]:
    if data is None:
        return Step(CA_SECRET, Action.CREATE, "missing"), None
    try:
        cert = _load_ca(data)
    except (KeyError, ValueError, x509.ExtensionNotFound) as exc:
        return Step(CA_SECRET, Action.RENEW, f"unreadable ({exc})"), None
    if cert.not_valid_after_utc <= now:
        return Step(CA_SECRET, Action.RENEW, "expired"), None
    return Step(CA_SECRET, Action.KEEP, "valid"), cert


def _sans(cert: x509.Certificate) -> set[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    names = set(ext.get_values_for_type(x509.DNSName))
    return names | {str(ip) for ip in ext.get_values_for_type(x509.IPAddress)}


def _leaf_reason(
    leaf: Leaf,
    data: Mapping[str, bytes],
    ca: x509.Certificate,
    *,
    now: datetime.datetime,
    renew_within: datetime.timedelta,
) -> str:
    """Why ``leaf``'s Secret must be renewed, or "" when it may be kept."""
    try:
        cert = x509.load_pem_x509_certificate(data["tls.crt"])
        key = serialization.load_pem_private_key(data["tls.key"], password=None)
    except (KeyError, ValueError) as exc:
        return f"unreadable ({exc})"
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        return "the key is not the certificate's"
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return "not signed by the CA"
    if data.get("ca.crt") != ca.public_bytes(serialization.Encoding.PEM):
        return "ca.crt is not the CA"
    if _sans(cert) != set(leaf.hosts):
        return f"names {sorted(_sans(cert))}, wanted {sorted(leaf.hosts)}"
    if cert.not_valid_after_utc - now <= renew_within:
        return f"expires {cert.not_valid_after_utc.isoformat()}"
    return ""


def plan(
    existing: Existing,
    *,
    wanted: Sequence[Leaf],
    identities: Sequence[Identity] = IDENTITIES,
    now: datetime.datetime,
    renew_within: datetime.timedelta = RENEW_WITHIN,
    renew: bool = False,
) -> tuple[Step, ...]:
    """What to do with each Secret, given ``existing`` (Secret name -> its decoded data,
    absent when the Secret does not exist) at time ``now`` (timezone-aware): the CA's
    step first, then each of ``wanted`` in order, then each identity's seed. Pure.

    - the CA is kept while it is readable, a CA, and not expired; otherwise a new one is
      made (and so every leaf is renewed);
    - a leaf is created when missing, renewed when ``renew``, when the CA is new, or for
      the reason ``_leaf_reason`` gives (unreadable, key mismatch, another CA, another
      ``ca.crt``, other names, expiring within ``renew_within``), else kept;
    - a seed is created when missing or not a NATS user seed, else kept: a new seed
      would lock out every pod still holding the old one until it restarts.
    """
    ca_step, ca = _ca_step(existing.get(CA_SECRET), now=now)
    steps = [ca_step]
    for leaf in wanted:
        data = existing.get(leaf.secret)
        if data is None:
            steps.append(Step(leaf.secret, Action.CREATE, "missing"))
            continue
        if ca is None:
            steps.append(Step(leaf.secret, Action.RENEW, "new CA"))
            continue
        reason = _leaf_reason(leaf, data, ca, now=now, renew_within=renew_within)
        if renew and not reason:
            reason = "renewal asked for"
        steps.append(Step(leaf.secret, Action.RENEW if reason else Action.KEEP, reason or "valid"))
    for identity in identities:
        seed = existing.get(identity.secret, {}).get(SEED_KEY)
        if identity.secret not in existing or seed is None:
            steps.append(Step(identity.secret, Action.CREATE, "missing"))
            continue
        try:
            trust.public_key(seed)
        except trust.TrustError as exc:
            steps.append(Step(identity.secret, Action.RENEW, str(exc)))
            continue
        steps.append(Step(identity.secret, Action.KEEP, "kept: pods hold it"))
    return tuple(steps)


def authorization_conf(
    seeds: Mapping[str, bytes], *, identities: Sequence[Identity] = IDENTITIES, prefix: str
) -> bytes:
    """The ``auth.conf`` nats.conf includes: ``authorization: {...}`` (JSON, which
    nats-server's config parser reads) with one NKEY user per identity, its public key
    taken from ``seeds`` (identity name -> seed), permissions for bus ``prefix``. Pure.
    Raises ``libshared.trust.TrustError`` for a bad seed or prefix."""
    records = [
        trust.IdentityRecord(
            name=i.name,
            role=str(i.role),
            prefix=prefix,
            node=i.node,
            public_key=trust.public_key(seeds[i.name]),
        )
        for i in identities
    ]
    block = trust.authorization(records)
    return b"authorization: " + json.dumps(block, indent=1).encode() + b"\n"


# -- I/O ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """One run: ``namespace``, bus ``prefix``, ``nats_replicas``, ``renew`` (renew every
    leaf), ``renew_within`` (renew leaves expiring sooner), ``webhook_config`` (the
    MutatingWebhookConfiguration whose caBundle to set), ``webhook_wait_s`` (how long to
    wait for it to exist: ``kubectl apply`` may create it after the Job starts, seconds),
    ``kube`` (the API server)."""

    namespace: str = NAMESPACE
    prefix: str = DEFAULT_PREFIX
    nats_replicas: int = NATS_REPLICAS
    renew: bool = False
    renew_within: datetime.timedelta = RENEW_WITHIN
    webhook_config: str = WEBHOOK_CONFIG
    webhook_wait_s: float = 120.0
    kube: kubeclients.KubeSettings = field(default_factory=kubeclients.KubeSettings)
    log_level: str = "info"


@dataclass(frozen=True)
class Report:
    """What a run did: the ``steps`` of the plan, the derived Secrets it (re)wrote
    (``derived``), and whether it changed the webhook configuration's caBundle."""

    steps: tuple[Step, ...]
    derived: tuple[str, ...]
    ca_bundle_patched: bool


def _decode(secret: client.V1Secret) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}


def _encode(data: Mapping[str, bytes]) -> dict[str, str]:
    return {k: base64.b64encode(v).decode() for k, v in sorted(data.items())}


class _Secrets:
    """The Job's Secrets: read by name, created, or patched with the version read as a
    precondition (a concurrent writer makes this run fail and retry rather than lose a
    write)."""

    def __init__(self, api: client.CoreV1Api, namespace: str) -> None:
        self.api = api
        self.namespace = namespace
        self.versions: dict[str, str] = {}

    async def read(self, name: str) -> dict[str, bytes] | None:
        try:
            secret = await self.api.read_namespaced_secret(name, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise CertsError(f"Secret {self.namespace}/{name}: read: {exc.reason}") from exc
        self.versions[name] = secret.metadata.resource_version
        return _decode(secret)

    async def write(self, name: str, data: Mapping[str, bytes], *, kind: str = "Opaque") -> None:
        try:
            if name in self.versions:
                patch = {
                    "metadata": {"resourceVersion": self.versions[name], "labels": LABELS},
                    "data": _encode(data),
                }
                await self.api.patch_namespaced_secret(name, self.namespace, patch)
            else:
                body = client.V1Secret(
                    api_version="v1",
                    kind="Secret",
                    metadata=client.V1ObjectMeta(
                        name=name, namespace=self.namespace, labels=dict(LABELS)
                    ),
                    type=kind,
                    data=_encode(data),
                )
                await self.api.create_namespaced_secret(self.namespace, body)
        except ApiException as exc:
            raise CertsError(f"Secret {self.namespace}/{name}: write: {exc.reason}") from exc


async def _patch_ca_bundle(
    api: client.AdmissionregistrationV1Api, settings: Settings, ca_pem: bytes
) -> bool:
    """Set every webhook's caBundle of the configuration to ``ca_pem``; False when they
    all had it. Waits up to ``settings.webhook_wait_s`` for the configuration."""
    bundle = base64.b64encode(ca_pem).decode()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.webhook_wait_s
    while True:
        try:
            config = await api.read_mutating_webhook_configuration(settings.webhook_config)
            break
        except ApiException as exc:
            if exc.status != 404:
                raise CertsError(
                    f"MutatingWebhookConfiguration {settings.webhook_config}: {exc.reason}"
                ) from exc
            if loop.time() >= deadline:
                raise CertsError(
                    f"MutatingWebhookConfiguration {settings.webhook_config}: not found "
                    f"within {settings.webhook_wait_s:.0f} s"
                ) from exc
            await asyncio.sleep(2.0)
    ops = [
        {"op": "add", "path": f"/webhooks/{i}/clientConfig/caBundle", "value": bundle}
        for i, hook in enumerate(config.webhooks or [])
        if hook.client_config.ca_bundle != bundle
    ]
    if not ops:
        return False
    try:
        await api.patch_mutating_webhook_configuration(settings.webhook_config, ops)
    except ApiException as exc:
        raise CertsError(
            f"MutatingWebhookConfiguration {settings.webhook_config}: patch: {exc.reason}"
        ) from exc
    return True


async def provision(api_client: client.ApiClient, settings: Settings) -> Report:
    """Bring the Secrets and the caBundle to what ``plan`` says (see the module
    docstring) and return what was done. Raises ``CertsError`` when an API call fails."""
    secrets = _Secrets(client.CoreV1Api(api_client), settings.namespace)
    wanted = leaves(namespace=settings.namespace, nats_replicas=settings.nats_replicas)
    existing: dict[str, dict[str, bytes]] = {}
    for name in sorted(secret_names(namespace=settings.namespace)):
        data = await secrets.read(name)
        if data is not None:
            existing[name] = data
    now = datetime.datetime.now(datetime.UTC)
    steps = plan(
        existing,
        wanted=wanted,
        now=now,
        renew_within=settings.renew_within,
        renew=settings.renew,
    )
    by_secret = {s.secret: s for s in steps}
    for step in steps:
        log.info(
            "secret planned",
            extra={"secret": step.secret, "action": str(step.action), "reason": step.reason},
        )

    if by_secret[CA_SECRET].action is Action.KEEP:
        ca_cert, ca_key = existing[CA_SECRET]["tls.crt"], existing[CA_SECRET]["tls.key"]
    else:
        ca_cert, ca_key = trust.new_ca("vslice CA")
        await secrets.write(CA_SECRET, {"tls.crt": ca_cert, "tls.key": ca_key}, kind=TLS_TYPE)
    for leaf in wanted:
        if by_secret[leaf.secret].action is Action.KEEP:
            continue
        cert, key = trust.issue_certificate(
            ca_cert, ca_key, common_name=leaf.common_name, hosts=leaf.hosts
        )
        data = {"tls.crt": cert, "tls.key": key, "ca.crt": ca_cert}
        await secrets.write(leaf.secret, data, kind=TLS_TYPE)
    seeds: dict[str, bytes] = {}
    for identity in IDENTITIES:
        if by_secret[identity.secret].action is Action.KEEP:
            seeds[identity.name] = existing[identity.secret][SEED_KEY]
            continue
        seeds[identity.name] = trust.new_nkey_seed() + b"\n"
        await secrets.write(identity.secret, {SEED_KEY: seeds[identity.name]})

    derived = {
        BUS_CA_SECRET: {"ca.crt": ca_cert},
        AUTH_SECRET: {AUTH_KEY: authorization_conf(seeds, prefix=settings.prefix)},
    }
    written = []
    for name, data in derived.items():
        if existing.get(name) != data:
            await secrets.write(name, data)
            written.append(name)
            log.info("secret written", extra={"secret": name})
    patched = await _patch_ca_bundle(
        client.AdmissionregistrationV1Api(api_client), settings, ca_cert
    )
    log.info(
        "webhook caBundle " + ("patched" if patched else "current"),
        extra={"config": settings.webhook_config},
    )
    return Report(steps=steps, derived=tuple(written), ca_bundle_patched=patched)


def parse(argv: Sequence[str] | None = None) -> Settings:
    """Settings from ``argv``. Exits (``SystemExit`` 2) on an invalid flag or value."""
    parser = argparse.ArgumentParser(
        prog="python -m vslice.kubecerts",
        description="create or renew vslice's CA, certificates and bus identities in "
        "Kubernetes Secrets and set the webhook's caBundle",
    )
    parser.add_argument("--namespace", default=NAMESPACE)
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="bus prefix (default vslice)")
    parser.add_argument("--nats-replicas", type=int, default=NATS_REPLICAS)
    parser.add_argument("--renew", action="store_true", help="renew every leaf certificate")
    parser.add_argument(
        "--renew-within-days",
        type=float,
        default=RENEW_WITHIN.days,
        help="renew certificates expiring within this many days (default 30)",
    )
    parser.add_argument("--webhook-config", default=WEBHOOK_CONFIG)
    parser.add_argument("--webhook-wait", type=float, default=120.0, help="seconds")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(list(argv or []))
    if not 1 <= args.nats_replicas <= 32:
        parser.error(f"--nats-replicas {args.nats_replicas}: must be 1-32")
    if args.renew_within_days < 0:
        parser.error(f"--renew-within-days {args.renew_within_days}: must be 0 or more")
    try:
        Subjects(prefix=args.prefix)
    except ValueError as exc:
        parser.error(f"--prefix {args.prefix!r}: {exc}")
    return Settings(
        namespace=args.namespace,
        prefix=args.prefix,
        nats_replicas=args.nats_replicas,
        renew=args.renew,
        renew_within=datetime.timedelta(days=args.renew_within_days),
        webhook_config=args.webhook_config,
        webhook_wait_s=args.webhook_wait,
        log_level=args.log_level,
    )


async def _main(settings: Settings) -> Report:
    async with await kubeclients.api_client(settings.kube) as api:
        return await provision(api, settings)


def main(argv: Sequence[str] | None = None) -> int:
    """The Job's entry point: 0 when everything is in place, 1 (with the reason logged)
    when not."""
    settings = parse(sys.argv[1:] if argv is None else argv)
    logs.setup("kubecerts", level=settings.log_level)
    try:
        asyncio.run(_main(settings))
    except (CertsError, kubeclients.KubeConfigError, trust.TrustError) as exc:
        log.error("certificates not provisioned", extra={"error": str(exc)})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
