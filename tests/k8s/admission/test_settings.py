"""The admission service's settings and process in Kubernetes mode: the contract's flags
(and their VSLICE_ variables), no NATS needed for the webhook, and the process serving
HTTPS reviews, logging each decision, and exiting cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import pytest

from libshared.connecting import BusSettings
from services.admission import settings
from tests.k8s.admission.conftest import Tls
from tests.k8s.admission.reviews import ctr, pod, review

REPO = Path(__file__).resolve().parents[3]
TLS_FLAGS = ["--tls-cert", "/tls/tls.crt", "--tls-key", "/tls/tls.key"]


def test_the_contract_flags_set_the_webhook() -> None:
    parsed = settings.parse(
        ["--webhook-port", "8443", *TLS_FLAGS, "--scheduler-name", "gpu", "--sm-policy", "force"],
        {},
    )
    hook = parsed.webhook
    assert (hook.port, hook.tls_cert, hook.tls_key) == (8443, "/tls/tls.crt", "/tls/tls.key")
    assert (parsed.mutation.scheduler_name, parsed.mutation.core_policy) == ("gpu", "force")
    assert parsed.mutation.resources == parsed.resources


def test_every_flag_reads_its_vslice_variable_and_flags_win() -> None:
    env = {
        "VSLICE_WEBHOOK_PORT": "9443",
        "VSLICE_TLS_CERT": "/c",
        "VSLICE_TLS_KEY": "/k",
        "VSLICE_SCHEDULER_NAME": "from-env",
        "VSLICE_SM_POLICY": "disable",
        "VSLICE_DEFAULT_GPU_NUM": "2",
        "VSLICE_DCU_MEMORY_FACTOR": "4",
    }
    from_env = settings.parse([], env)
    assert from_env.resources.dcu_memory_factor == 4
    assert (from_env.webhook.port, from_env.webhook.scheduler_name) == (9443, "from-env")
    assert (from_env.webhook.core_policy, from_env.resources.default_gpu_num) == ("disable", 2)
    flagged = settings.parse(["--webhook-port", "8443", "--scheduler-name", "flag"], env)
    assert (flagged.webhook.port, flagged.webhook.scheduler_name) == (8443, "flag")


def test_the_webhook_needs_no_nats_unless_one_is_given() -> None:
    assert settings.parse(["--webhook-port", "8443", *TLS_FLAGS], {}).bus is None
    given = settings.parse(
        ["--webhook-port", "8443", *TLS_FLAGS, "--nats-url", "nats://nats:4222"], {}
    )
    assert given.bus is not None and given.bus.urls == ("nats://nats:4222",)
    from_env = settings.parse(
        ["--webhook-port", "8443", *TLS_FLAGS], {"VSLICE_NATS_URL": "nats://a:4222"}
    )
    assert from_env.bus is not None and from_env.bus.urls == ("nats://a:4222",)


def test_without_the_webhook_the_bus_is_used_as_before() -> None:
    assert settings.parse([], {}) == settings.Settings()
    assert settings.parse([], {}).bus == BusSettings()
    assert settings.parse([], {}).webhook.port == 0


@pytest.mark.parametrize(
    ("argv", "env", "needle"),
    [
        (["--webhook-port", "8443"], {}, "needs --tls-cert and --tls-key"),
        (["--webhook-port", "8443", "--tls-cert", "/c"], {}, "needs --tls-cert and --tls-key"),
        (["--webhook-port", "70000", *TLS_FLAGS], {}, "--webhook-port 70000"),
        ([], {"VSLICE_WEBHOOK_PORT": "https"}, "--webhook-port 'https' (from VSLICE_WEBHOOK_PORT)"),
        (["--sm-policy", "always"], {}, "invalid choice: 'always'"),
        ([], {"VSLICE_SM_POLICY": "always"}, "--sm-policy 'always'"),
        (["--scheduler-name", ""], {}, "--scheduler-name"),
        (["--tls-reload", "0"], {}, "--tls-reload 0"),
        (["--default-cores", "101"], {}, "--default-cores 101"),
        (["--default-gpu-num", "-1"], {}, "--default-gpu-num -1"),
        (["--dcu-memory-factor", "0"], {}, "--dcu-memory-factor 0"),
        ([], {"VSLICE_DCU_MEMORY_FACTOR": "x"}, "--dcu-memory-factor 'x'"),
    ],
)
def test_a_bad_value_exits_naming_the_flag_and_value(
    argv: list[str], env: dict[str, str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        settings.parse(argv, env)
    assert exited.value.code == 2
    assert needle in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_the_service_serves_reviews_over_https_without_nats_and_stops_on_sigterm(
    tls: Tls,
) -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VSLICE_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.admission",
        "--webhook-port",
        str(port),
        "--webhook-host",
        "127.0.0.1",
        "--tls-cert",
        str(tls.cert),
        "--tls-key",
        str(tls.key),
        cwd=REPO,
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        url = f"https://127.0.0.1:{port}"
        connector = aiohttp.TCPConnector(ssl=tls.client_context())
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(300):  # generous: a cold interpreter on a busy machine
                try:
                    async with session.get(url + "/readyz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientConnectorError:
                    pass
                await asyncio.sleep(0.1)
            else:
                pytest.fail("the webhook never became ready")
            body = review(pod(ctr(limits={"nvidia.com/gpumem": 3000})))
            async with session.post(url + "/mutate", json=body) as resp:
                assert resp.status == 200
                assert (await resp.json())["response"]["patchType"] == "JSONPatch"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        assert proc.stderr is not None
        lines = [json.loads(line) for line in (await proc.stderr.read()).splitlines()]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    decisions = [r for r in lines if r.get("verdict")]
    assert [(r["verdict"], r["pod"]) for r in decisions] == [("mutated", "ml/train")]
    assert "nvidia.com~1gpu" in decisions[0]["patch"]
    assert not [r for r in lines if r["level"] == "error"]
    assert any(r["msg"] == "webhook serving" for r in lines)


async def test_the_service_exits_1_naming_a_missing_certificate(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VSLICE_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.admission",
        "--webhook-port",
        str(_free_port()),
        "--tls-cert",
        str(tmp_path / "none.crt"),
        "--tls-key",
        str(tmp_path / "none.key"),
        cwd=REPO,
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    (record,) = [json.loads(line) for line in err.splitlines()]
    assert record["msg"] == "cannot serve"
    assert "No such file" in record["error"]
