"""Trust material of a bus: a CA, TLS certificates, NKEY identities and the server's
authorization, generated here and kept in one directory.

``vslice up``, the tests, compose's ``certs`` service and the Kubernetes certificate Job
all provision a bus the same way: ``TrustStore(dir).ensure(hosts=...)`` creates, once, a
CA (``ca.pem``) and a server certificate for ``hosts`` signed by it (``server.pem``,
usable for client and route connections of a NATS cluster); ``add_identity`` creates an
NKEY user of one role (``libshared.permissions``) whose seed lands in
``nkeys/<identity>.nk``; ``server_config`` renders nats-server's configuration (JSON,
which nats-server's config parser reads) with TLS and one user per identity carrying its
role's permissions. Certificates and keys come from ``cryptography`` and ``nkeys`` (the
NATS project's NKEY library), never from a shell-out.

Every private file (keys, seeds, the identity list) is written 0600 in a 0700 directory,
atomically (written beside, then renamed), so a reader never sees half a key and a
rotation swaps whole files. ``rotate_certificates`` issues a new server certificate from
the same CA (clients keep trusting it); nats-server reloads it on SIGHUP.

What it leaves to others: starting the server with the config (``libshared.natsserver``),
connecting with an identity (``libshared.connecting``).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec
import nkeys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from libshared import bounds
from libshared import permissions as perms
from libshared.errors import VsliceError
from libshared.subjects import Subjects

CA_DAYS = 3650
CERT_DAYS = 365
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,200}$")


class TrustError(VsliceError):
    """Trust material is missing, unreadable or asked for with a bad value; the message
    names the file or field."""


class IdentityRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One bus identity: its ``name`` (the seed file's stem and inbox prefix), ``role``,
    ``prefix`` (the bus it may use), ``node`` (node agents only) and NKEY ``public_key``."""

    name: str
    role: str
    prefix: str
    node: str = ""
    public_key: str


_IDENTITIES = msgspec.json.Decoder(list[IdentityRecord])


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def new_ca(common_name: str = "vslice CA") -> tuple[bytes, bytes]:
    """A new self-signed CA: ``(certificate PEM, private key PEM)``, valid ``CA_DAYS``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def issue_certificate(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    *,
    common_name: str,
    hosts: Sequence[str],
    days: int = CERT_DAYS,
) -> tuple[bytes, bytes]:
    """A certificate for ``hosts`` (DNS names or IP addresses, the first is the common
    name's fallback) signed by the CA, for both server and client authentication (a NATS
    route is both): ``(certificate PEM, private key PEM)``.

    Raises ``TrustError`` when ``hosts`` is empty or the CA cannot be read.
    """
    if not hosts:
        raise TrustError("hosts: a certificate needs at least one DNS name or IP address")
    try:
        ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
        ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    except ValueError as exc:
        raise TrustError(f"CA: unreadable certificate or key: {exc}") from exc
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise TrustError("CA: the key is not an EC key")
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(hosts), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def new_nkey_seed() -> bytes:
    """A new NKEY user seed (``SU...``, as ``nats.connect(nkeys_seed=...)`` reads it)."""
    return bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))


def public_key(seed: bytes) -> str:
    """The public NKEY (``U...``) of a user seed. Raises ``TrustError`` for a bad seed."""
    try:
        return bytes(nkeys.from_seed(bytearray(seed.strip())).public_key).decode()
    except (nkeys.NkeysError, ValueError) as exc:
        raise TrustError(f"nkey seed: not a NATS user seed ({exc})") from exc


def authorization(records: Iterable[IdentityRecord]) -> dict[str, object]:
    """nats-server's ``authorization`` block (a dict to write as JSON): one NKEY user per
    record with its role's permissions (``libshared.permissions``). Pure; used by
    ``TrustStore.server_config`` and by the Kubernetes certificate Job, whose identities
    live in Secrets rather than in a store directory. Raises ``TrustError`` when a
    record's role, prefix or node is invalid."""
    users = []
    for record in records:
        try:
            granted = perms.permissions(
                perms.Role(record.role),
                subjects=Subjects(prefix=record.prefix),
                identity=record.name,
                node=record.node,
            )
        except ValueError as exc:
            raise TrustError(f"identity {record.name!r}: {exc}") from exc
        permissions: dict[str, object] = {
            "publish": {"allow": list(granted.publish)},
            "subscribe": {"allow": list(granted.subscribe)},
        }
        if granted.allow_responses:
            permissions["allow_responses"] = True
        users.append({"nkey": record.public_key, "permissions": permissions})
    return {"users": users}


@dataclass(frozen=True)
class TrustStore:
    """The trust material in ``root`` (see the module docstring for the files)."""

    root: Path

    @property
    def ca_path(self) -> Path:
        """The CA certificate (PEM): clients verify the server with it."""
        return self.root / "ca.pem"

    @property
    def ca_key_path(self) -> Path:
        """The CA's private key (PEM, 0600)."""
        return self.root / "ca-key.pem"

    @property
    def cert_path(self) -> Path:
        """The server certificate (PEM)."""
        return self.root / "server.pem"

    @property
    def key_path(self) -> Path:
        """The server certificate's private key (PEM, 0600)."""
        return self.root / "server-key.pem"

    @property
    def identities_path(self) -> Path:
        """The list of identities (JSON, 0600)."""
        return self.root / "identities.json"

    def seed_path(self, name: str) -> Path:
        """The NKEY seed file of identity ``name`` (0600)."""
        return self.root / "nkeys" / f"{name}.nk"

    def ensure(self, *, hosts: Sequence[str] = LOCAL_HOSTS) -> TrustStore:
        """Create the CA and the server certificate for ``hosts`` when missing (existing
        ones are kept, so a restarted stack keeps its keys). Returns ``self``."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        if not (self.ca_path.exists() and self.ca_key_path.exists()):
            cert, key = new_ca()
            _write_private(self.ca_key_path, key)
            _write_private(self.ca_path, cert)
        if not (self.cert_path.exists() and self.key_path.exists()):
            self.rotate_certificates(hosts=hosts)
        return self

    def rotate_certificates(self, *, hosts: Sequence[str] = LOCAL_HOSTS) -> None:
        """Issue a new server certificate for ``hosts`` from the existing CA (clients
        trusting the CA accept it at once). Raises ``TrustError`` without a CA."""
        try:
            ca_cert, ca_key = self.ca_path.read_bytes(), self.ca_key_path.read_bytes()
        except OSError as exc:
            raise TrustError(f"{self.root}: no CA to sign with ({exc})") from exc
        cert, key = issue_certificate(ca_cert, ca_key, common_name="vslice-nats", hosts=hosts)
        _write_private(self.key_path, key)
        _write_private(self.cert_path, cert)

    def identities(self) -> list[IdentityRecord]:
        """Every identity (empty before the first). Raises ``TrustError`` when the list
        cannot be read."""
        try:
            return _IDENTITIES.decode(self.identities_path.read_bytes())
        except FileNotFoundError:
            return []
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise TrustError(f"{self.identities_path}: unreadable ({exc})") from exc

    def add_identity(self, name: str, role: perms.Role, *, prefix: str, node: str = "") -> Path:
        """Create identity ``name`` of ``role`` on the bus ``prefix`` (``node`` for a node
        agent) when missing, and return its seed file. An existing identity of the same
        role, prefix and node is kept (same seed).

        Raises ``TrustError`` when ``name`` is not 1-200 letters, digits, ``-`` or ``_``,
        when it exists with another role, prefix or node, or when ``role``, ``prefix`` or
        ``node`` are invalid (``permissions.permissions``).
        """
        if not _NAME.match(name):
            raise TrustError(f"identity {name!r}: 1-200 letters, digits, '-' or '_'")
        try:
            perms.permissions(role, subjects=Subjects(prefix=prefix), identity=name, node=node)
        except ValueError as exc:
            raise TrustError(f"identity {name!r}: {exc}") from exc
        known = self.identities()
        seed_path = self.seed_path(name)
        for record in known:
            if record.name != name:
                continue
            if (record.role, record.prefix, record.node) != (str(role), prefix, node):
                raise TrustError(
                    f"identity {name!r} exists as role {record.role} on prefix "
                    f"{record.prefix!r}{' node ' + record.node if record.node else ''}"
                )
            if seed_path.exists():
                return seed_path
        seed = new_nkey_seed()
        _write_private(seed_path, seed + b"\n")
        record = IdentityRecord(
            name=name, role=str(role), prefix=prefix, node=node, public_key=public_key(seed)
        )
        kept = [r for r in known if r.name != name]
        _write_private(self.identities_path, msgspec.json.encode([*kept, record]))
        return seed_path

    def remove_identity(self, name: str) -> bool:
        """Revoke identity ``name``: drop it from the list (its seed file stays; the
        server no longer knows its key); returns whether it existed. A running server
        drops its connections on the next reload and refuses them from then on. Raises
        ``TrustError`` when the list cannot be read."""
        known = self.identities()
        kept = [r for r in known if r.name != name]
        if len(kept) == len(known):
            return False
        _write_private(self.identities_path, msgspec.json.encode(kept))
        return True

    def server_config(self, *, tls: bool = True, cluster_tls: bool = False) -> dict[str, object]:
        """nats-server's configuration (a dict to write as JSON): one NKEY user per
        identity with its role's permissions, and TLS with the server certificate when
        ``tls`` (``cluster_tls``: routes too, each side verifying the other's certificate),
        and ``max_payload`` ``bounds.MAX_PAYLOAD_BYTES``, above the largest value the
        bounds admit (``libshared.payloads``). Raises ``TrustError`` when an identity's
        record is invalid."""
        config: dict[str, object] = {
            "authorization": authorization(self.identities()),
            "max_payload": bounds.MAX_PAYLOAD_BYTES,
        }
        tls_block = {
            "cert_file": str(self.cert_path),
            "key_file": str(self.key_path),
            "ca_file": str(self.ca_path),
            "timeout": 5,
        }
        if tls:
            config["tls"] = tls_block
        if cluster_tls:
            config["cluster"] = {"tls": {**tls_block, "verify": True}}
        return config

    def write_server_config(self, path: Path, **kwargs: bool) -> Path:
        """Write ``server_config(**kwargs)`` to ``path`` (0600, atomically); returns it."""
        _write_private(path, json.dumps(self.server_config(**kwargs), indent=1).encode())
        return path
