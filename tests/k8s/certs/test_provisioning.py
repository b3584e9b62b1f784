"""``vslice.kubecerts.provision`` against an emulated API server (kmock): a first run
writes every Secret and patches the webhook configuration's caBundle; a second changes
nothing; ``--renew`` renews the leaves and keeps the CA, the seeds and the caBundle; a
missing webhook configuration fails the run after its wait. Then the Secrets at work: a
nats-server configured with the Job's certificate and authorization takes each identity
over TLS and refuses a stranger, and two such nodes route to each other over TLS verified
both ways, refusing a route without a certificate."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import subprocess
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kmock
import nats
import pytest
from cryptography import x509

from libshared import kubeclients, trust
from libshared.natsserver import find_binary, free_port
from tests.k8s.certs.objects import SECRETS, ca_bundles, data, secrets, serve_trust_objects
from tests.scheduler.k8s.kubeapi import ApiServer
from vslice import kubecerts


@pytest.fixture
async def api() -> AsyncIterator[ApiServer]:
    async with ApiServer() as server, kmock.Server(server):
        yield server


async def run(api: ApiServer, **settings: Any) -> kubecerts.Report:
    kube = kubeclients.KubeSettings(host=str(api.url).rstrip("/"))
    async with await kubeclients.api_client(kube) as client:
        return await kubecerts.provision(client, kubecerts.Settings(kube=kube, **settings))


async def test_a_first_run_writes_every_secret_and_the_ca_bundle_and_a_second_changes_nothing(
    api: ApiServer,
) -> None:
    serve_trust_objects(api)
    report = await run(api)
    stored = secrets(api)
    assert stored.keys() == kubecerts.secret_names()
    ca = data(stored[kubecerts.CA_SECRET])
    ca_cert = x509.load_pem_x509_certificate(ca["tls.crt"])
    assert ca_bundles(api) == [ca["tls.crt"]]
    assert report.ca_bundle_patched
    for leaf in kubecerts.leaves():
        secret = stored[leaf.secret]
        assert secret["type"] == "kubernetes.io/tls"
        files = data(secret)
        assert files["ca.crt"] == ca["tls.crt"]
        cert = x509.load_pem_x509_certificate(files["tls.crt"])
        cert.verify_directly_issued_by(ca_cert)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = set(san.get_values_for_type(x509.DNSName))
        names |= {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
        assert names == set(leaf.hosts)
        assert secret["metadata"]["labels"]["app.kubernetes.io/part-of"] == "vslice"
    assert stored[kubecerts.CA_SECRET]["type"] == "kubernetes.io/tls"
    assert data(stored[kubecerts.BUS_CA_SECRET]) == {"ca.crt": ca["tls.crt"]}
    seeds = {i.name: data(stored[i.secret])[kubecerts.SEED_KEY] for i in kubecerts.IDENTITIES}
    auth = data(stored[kubecerts.AUTH_SECRET])[kubecerts.AUTH_KEY]
    users = json.loads(auth.removeprefix(b"authorization: "))["users"]
    assert {u["nkey"] for u in users} == {trust.public_key(s) for s in seeds.values()}

    again = await run(api)
    assert all(s.action is kubecerts.Action.KEEP for s in again.steps), again.steps
    assert again.derived == () and not again.ca_bundle_patched
    assert {n: data(s) for n, s in secrets(api).items()} == {n: data(s) for n, s in stored.items()}


async def test_renewal_issues_new_leaves_from_the_same_ca_and_keeps_the_seeds(
    api: ApiServer,
) -> None:
    serve_trust_objects(api)
    await run(api)
    before = {n: data(s) for n, s in secrets(api).items()}
    report = await run(api, renew=True)
    after = {n: data(s) for n, s in secrets(api).items()}
    renewed = {s.secret for s in report.steps if s.action is kubecerts.Action.RENEW}
    assert renewed == {leaf.secret for leaf in kubecerts.leaves()}
    for name in renewed:
        assert after[name]["tls.crt"] != before[name]["tls.crt"]
        assert after[name]["tls.key"] != before[name]["tls.key"]
        assert after[name]["ca.crt"] == before[kubecerts.CA_SECRET]["tls.crt"]
    for name in kubecerts.secret_names() - renewed:  # CA, seeds, bus CA, authorization
        assert after[name] == before[name], name
    assert not report.ca_bundle_patched and report.derived == ()


async def test_a_lost_ca_is_replaced_with_every_leaf_and_the_ca_bundle_follows(
    api: ApiServer,
) -> None:
    serve_trust_objects(api)
    await run(api)
    old_ca = data(secrets(api)[kubecerts.CA_SECRET])["tls.crt"]
    api.objects[SECRETS, kubecerts.NAMESPACE, kubecerts.CA_SECRET].delete()
    report = await run(api)
    new_ca = data(secrets(api)[kubecerts.CA_SECRET])["tls.crt"]
    assert new_ca != old_ca
    assert ca_bundles(api) == [new_ca] and report.ca_bundle_patched
    assert report.derived == (kubecerts.BUS_CA_SECRET,)  # the users (seeds) are unchanged
    for leaf in kubecerts.leaves():
        assert data(secrets(api)[leaf.secret])["ca.crt"] == new_ca


async def test_without_the_webhook_configuration_the_run_fails_naming_it_after_its_wait(
    api: ApiServer,
) -> None:
    serve_trust_objects(api, webhook=False)
    with pytest.raises(kubecerts.CertsError, match="vslice-admission: not found within"):
        await run(api, webhook_wait_s=0.2)
    assert secrets(api).keys() == kubecerts.secret_names()  # a retry finds them


async def test_nats_with_the_jobs_certificate_and_authorization_takes_each_identity_over_tls(
    api: ApiServer, tmp_path: Path
) -> None:
    serve_trust_objects(api)
    await run(api, prefix="jobbus")
    stored = secrets(api)
    files: dict[str, Path] = {}
    for name, key in (
        (kubecerts.AUTH_SECRET, kubecerts.AUTH_KEY),
        ("vslice-nats-tls", "tls.crt"),
        ("vslice-nats-tls", "tls.key"),
        (kubecerts.BUS_CA_SECRET, "ca.crt"),
    ):
        files[key] = tmp_path / key
        files[key].write_bytes(data(stored[name])[key])
    port = free_port()
    conf = tmp_path / "nats.conf"
    conf.write_text(
        f"port: {port}\nhost: 127.0.0.1\n"
        f"tls {{\n cert_file: {files['tls.crt']}\n key_file: {files['tls.key']}\n"
        f" ca_file: {files['ca.crt']}\n timeout: 5\n}}\ninclude auth.conf\n"
    )
    log = tmp_path / "nats.log"
    with log.open("wb") as out:
        server = subprocess.Popen([str(find_binary()), "-c", str(conf)], stdout=out, stderr=out)
    try:
        context = ssl.create_default_context(cafile=str(files["ca.crt"]))
        for identity in kubecerts.IDENTITIES:
            seed = tmp_path / f"{identity.name}.nk"
            seed.write_bytes(data(stored[identity.secret])[kubecerts.SEED_KEY])
            nc = await nats.connect(
                f"tls://127.0.0.1:{port}",
                nkeys_seed=str(seed),
                tls=context,
                inbox_prefix=f"_INBOX_{identity.name}".encode(),
                max_reconnect_attempts=0,
                connect_timeout=10,
            )
            await nc.close()
        stranger = tmp_path / "stranger.nk"
        stranger.write_bytes(trust.new_nkey_seed())
        with pytest.raises(Exception, match=r"(?i)authorization"):
            await nats.connect(
                f"tls://127.0.0.1:{port}",
                nkeys_seed=str(stranger),
                tls=context,
                allow_reconnect=False,
                max_reconnect_attempts=0,
                connect_timeout=10,
            )
    finally:
        server.terminate()
        server.wait(10)


def _routes(http: int) -> list[dict[str, Any]]:
    """The routes a nats-server's monitoring endpoint lists (none while it starts)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/routez", timeout=2) as resp:
            found: list[dict[str, Any]] = json.load(resp).get("routes") or []
            return found
    except OSError:
        return []


def _first_line(port: int, context: ssl.SSLContext) -> bytes:
    """The first line a TLS connection to 127.0.0.1:``port`` reads (b"" when closed)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        return tls.makefile("rb").readline()


async def test_two_nats_nodes_route_over_tls_verified_both_ways_with_the_jobs_certificate(
    api: ApiServer, tmp_path: Path
) -> None:
    serve_trust_objects(api)
    await run(api)
    stored = secrets(api)
    for key, value in data(stored["vslice-nats-tls"]).items():
        (tmp_path / key).write_bytes(value)
    auth = data(stored[kubecerts.AUTH_SECRET])[kubecerts.AUTH_KEY]
    (tmp_path / kubecerts.AUTH_KEY).write_bytes(auth)
    tls = (
        f"cert_file: {tmp_path / 'tls.crt'}\n key_file: {tmp_path / 'tls.key'}\n"
        f" ca_file: {tmp_path / 'ca.crt'}\n timeout: 5\n"
    )
    nodes = [(free_port(), free_port(), free_port()) for _ in range(2)]  # client, route, http
    with contextlib.ExitStack() as stack:
        for i, (port, route, http) in enumerate(nodes):
            conf = tmp_path / f"node{i}.conf"
            conf.write_text(
                f"server_name: n{i}\nport: {port}\nhost: 127.0.0.1\nhttp_port: {http}\n"
                f"tls {{\n {tls}}}\ninclude {kubecerts.AUTH_KEY}\n"
                f"cluster {{\n name: c\n host: 127.0.0.1\n port: {route}\n"
                f" tls {{\n {tls} verify: true\n }}\n"
                f" routes: [nats://127.0.0.1:{nodes[1 - i][1]}]\n}}\n"
            )
            log = stack.enter_context((tmp_path / f"node{i}.log").open("wb"))
            server = subprocess.Popen([str(find_binary()), "-c", str(conf)], stdout=log, stderr=log)
            stack.callback(server.wait, 10)
            stack.callback(server.terminate)
        for _ in range(300):
            if all(_routes(http) for _, _, http in nodes):
                break
            await asyncio.sleep(0.1)
        logs = "\n".join(
            (tmp_path / f"node{i}.log").read_text(errors="replace")[-2000:] for i in range(2)
        )
        for i, (_, route, http) in enumerate(nodes):
            routes = _routes(http)
            assert routes and all(r["remote_name"] == f"n{1 - i}" for r in routes), logs
            # the route port speaks TLS alone and asks for a certificate from the CA
            member = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
            member.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
            info = json.loads(_first_line(route, member).removeprefix(b"INFO "))
            assert info["tls_required"] is True and info["tls_verify"] is True, info
            stranger = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
            with contextlib.suppress(ssl.SSLError, OSError):
                assert not _first_line(route, stranger).startswith(b"INFO")
