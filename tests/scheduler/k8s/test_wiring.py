"""The scheduler's Kubernetes flags, the API client's sources, and a replica started by
``app.main`` with the extender and the Kubernetes side on."""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

import aiohttp
import pytest
import trustme
from nats.aio.client import Client

from libshared import kubeclients
from libshared.connecting import BusSettings
from services.scheduler import app, settings
from tests.bus import helpers
from tests.scheduler.k8s.harness import bind_pod, create_pod, eventually, filter_pod
from tests.scheduler.k8s.kubeapi import ApiServer
from tests.scheduler.k8s.pods import pod, registration


def test_kubernetes_flags_have_the_contracts_names_and_defaults() -> None:
    s = settings.parse([], environ={})
    assert (s.extender_port, s.kube, s.reservation_ttl_s) == (0, None, 60.0)
    s = settings.parse(["--extender-port", "8888", "--kube", "--reservation-ttl", "30"], {})
    assert (s.extender_port, s.reservation_ttl_s) == (8888, 30.0)
    assert s.kube == kubeclients.KubeSettings()


def test_every_kubernetes_flag_reads_its_environment_variable_and_flags_win() -> None:
    env = {
        "VSLICE_EXTENDER_PORT": "9000",
        "VSLICE_KUBE": "true",
        "VSLICE_RESERVATION_TTL": "12.5",
        "VSLICE_TLS_CERT": "/c.pem",
        "VSLICE_TLS_KEY": "/k.pem",
    }
    s = settings.parse([], environ=env)
    assert (s.extender_port, s.kube is not None, s.reservation_ttl_s) == (9000, True, 12.5)
    assert (s.tls_cert, s.tls_key) == ("/c.pem", "/k.pem")
    assert settings.parse(["--extender-port", "8888"], environ=env).extender_port == 8888


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--extender-port", "70000"], "--extender-port 70000"),
        (["--extender-port", "x"], "--extender-port"),
        (["--reservation-ttl", "0"], "--reservation-ttl 0.0"),
        (["--tls-cert", "/c.pem"], "--tls-cert and --tls-key"),
    ],
)
def test_bad_kubernetes_flags_are_refused_naming_the_flag(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        settings.parse(argv, environ={})
    assert says in capsys.readouterr().err


def test_the_api_source_is_explicit_host_then_in_cluster_then_kubeconfig(tmp_path: Path) -> None:
    host = kubeclients.KubeSettings(host="http://127.0.0.1:1")
    assert kubeclients.describe(host, {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}) == (
        "host http://127.0.0.1:1"
    )
    default = kubeclients.KubeSettings()
    assert kubeclients.describe(default, {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}) == "in-cluster"
    config = str(tmp_path / "config")
    assert kubeclients.describe(default, {"KUBECONFIG": config}) == f"kubeconfig {config}"


async def test_an_unreadable_kubeconfig_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(kubeclients.KubeConfigError, match=f"kubeconfig {missing}"):
        await kubeclients.api_client(kubeclients.KubeSettings(), {"KUBECONFIG": str(missing)})


def kubeconfig(path: Path, server: str) -> Path:
    path.write_text(
        f"""apiVersion: v1
kind: Config
clusters:
- name: test
  cluster: {{server: "{server}"}}
users:
- name: test
  user: {{token: "t"}}
contexts:
- name: test
  context: {{cluster: test, user: test}}
current-context: test
"""
    )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_replica_started_by_its_app_serves_the_extender_over_tls_from_a_kubeconfig(
    nc: Client, bus_settings: BusSettings, api: ApiServer, tmp_path: Path
) -> None:
    await helpers.register(nc, bus_settings, [registration("n1")])
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "tls.crt"))
    cert.private_key_pem.write_to_path(str(tmp_path / "tls.key"))
    config = kubeconfig(tmp_path / "kubeconfig", str(api.url).rstrip("/"))
    port = free_port()
    s = settings.Settings(
        bus=bus_settings,
        name="wired",
        extender_port=port,
        extender_host="127.0.0.1",
        tls_cert=str(tmp_path / "tls.crt"),
        tls_key=str(tmp_path / "tls.key"),
        kube=kubeclients.KubeSettings(kubeconfig=str(config)),
        reservation_ttl_s=30,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(app.main(s, stop=stop))
    base = f"https://127.0.0.1:{port}"
    trusted = ssl.create_default_context()
    ca.configure_trust(trusted)
    connector = aiohttp.TCPConnector(ssl=trusted)
    try:
        async with aiohttp.ClientSession(connector=connector) as session:

            async def ready() -> bool:
                try:
                    async with session.get(base + "/readyz") as resp:
                        return resp.status == 200
                except aiohttp.ClientError:
                    return False

            for _ in range(200):
                if task.done():
                    task.result()
                if await ready():
                    break
                await asyncio.sleep(0.05)
            p = await create_pod(session, str(api.url).rstrip("/"), pod("wired"))
            answer = await filter_pod(session, base, p, ["n1"])
            assert answer["NodeNames"] == ["n1"]
            assert await bind_pod(session, base, p, "n1") == ""
            await eventually(
                lambda: (api.pod("default", "wired") or {}).get("spec", {}).get("nodeName") == "n1",
                what="bound",
            )
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--extender-port", "8443", "--extender-host", "0.0.0.0"], "needs --tls-cert"),
        (
            [
                *("--extender-port", "8443", "--extender-host", "10.1.2.3"),
                *("--tls-cert", "/c", "--tls-key", "/k"),
            ],
            "--tls-client-ca",
        ),
        (["--tls-client-ca", "/ca.pem"], "needs --tls-cert"),
    ],
)
def test_an_extender_off_loopback_without_mutual_tls_is_refused_at_start(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        settings.parse(argv, environ={})
    assert message in capsys.readouterr().err


def test_the_extender_listens_on_loopback_unless_told_otherwise() -> None:
    assert settings.parse(["--extender-port", "8443"], environ={}).extender_host == "127.0.0.1"
    s = settings.parse(
        [
            *("--extender-port", "8443", "--extender-host", "10.1.2.3"),
            *("--tls-cert", "/c", "--tls-key", "/k", "--tls-client-ca", "/ca"),
        ],
        environ={},
    )
    assert (s.extender_host, s.tls_client_ca) == ("10.1.2.3", "/ca")


async def test_the_extender_answers_only_callers_with_a_client_certificate_from_its_ca(
    nc: Client, bus_settings: BusSettings, tmp_path: Path
) -> None:
    await helpers.register(nc, bus_settings, [registration("n1")])
    ca, stranger_ca = trustme.CA(), trustme.CA()
    served = ca.issue_cert("127.0.0.1")
    served.cert_chain_pems[0].write_to_path(str(tmp_path / "tls.crt"))
    served.private_key_pem.write_to_path(str(tmp_path / "tls.key"))
    ca.cert_pem.write_to_path(str(tmp_path / "client-ca.crt"))
    port = free_port()
    s = settings.Settings(
        bus=bus_settings,
        name="mtls",
        extender_port=port,
        tls_cert=str(tmp_path / "tls.crt"),
        tls_key=str(tmp_path / "tls.key"),
        tls_client_ca=str(tmp_path / "client-ca.crt"),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(app.main(s, stop=stop))
    url = f"https://127.0.0.1:{port}/readyz"

    def context(client: trustme.CA | None) -> ssl.SSLContext:
        out = ssl.create_default_context()
        ca.configure_trust(out)
        if client is not None:
            client.issue_cert("kube-scheduler").configure_cert(out)
        return out

    async def status(client: trustme.CA | None) -> int | str:
        connector = aiohttp.TCPConnector(ssl=context(client))
        async with aiohttp.ClientSession(connector=connector) as session:
            try:
                async with session.get(url) as resp:
                    return resp.status
            except (aiohttp.ClientError, ssl.SSLError, ConnectionError) as exc:
                return type(exc).__name__

    try:
        for _ in range(400):
            if task.done():
                task.result()
            if await status(ca) == 200:
                break
            await asyncio.sleep(0.05)
        assert await status(ca) == 200
        assert await status(None) != 200  # no client certificate: the handshake fails
        assert await status(stranger_ca) != 200  # a certificate from another CA
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
