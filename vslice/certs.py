"""``vslice certs``: provision a bus's trust material into a directory.

What ``vslice up`` does for itself, as a command for a stack that is not started by
``vslice up`` -- compose's one-shot ``certs`` service runs it into a shared volume before
NATS starts: a CA and a server certificate for ``--host`` names (``libshared.trust``),
one NKEY identity per role for ``--prefix`` (the node agent's for ``--node``), and a
nats-server configuration (``nats.conf``: listeners, JetStream store, TLS,
authorization) that the NATS container reads. Re-running keeps the CA and the seeds and
renews the server certificate (``--renew``), so clients keep trusting it.

What it leaves to others: the Kubernetes certificate Job (``vslice.kubecerts``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from libshared import permissions as perms
from libshared.trust import TrustStore

# (identity, role) of a stack's services; the node agent's name depends on its node
ROLES = (
    ("admission", perms.Role.ADMISSION),
    ("scheduler", perms.Role.SCHEDULER),
    ("metrics", perms.Role.METRICS),
    ("cli", perms.Role.CLI),
)


def provision(
    directory: Path,
    *,
    prefix: str,
    nodes: Sequence[str],
    hosts: Sequence[str],
    store_dir: str = "/data",
    port: int = 4222,
    http_port: int = 8222,
    renew: bool = False,
) -> dict[str, Path]:
    """Create (or keep) the trust material of a stack in ``directory`` and write
    ``nats.conf``; returns each identity's seed file by identity name (``nodeagent-<node>``
    for each of ``nodes``, ``operator-<prefix>``, and the services of ``ROLES``).

    Raises ``libshared.trust.TrustError`` for a bad prefix, node or host list.
    """
    store = TrustStore(directory).ensure(hosts=hosts)
    if renew:
        store.rotate_certificates(hosts=hosts)
    seeds = {name: store.add_identity(name, role, prefix=prefix) for name, role in ROLES}
    operator = f"operator-{prefix}"
    seeds[operator] = store.add_identity(operator, perms.Role.OPERATOR, prefix=prefix)
    for node in nodes:
        name = f"nodeagent-{node}"
        seeds[name] = store.add_identity(name, perms.Role.NODEAGENT, prefix=prefix, node=node)
    config = store.server_config(tls=True)
    config.update(
        port=port,
        http=f"0.0.0.0:{http_port}",
        jetstream={"store_dir": store_dir},
    )
    path = directory / "nats.conf"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(config, indent=1))
    tmp.chmod(0o644)  # no secret in it: public keys and file paths
    tmp.replace(path)
    return seeds
