"""The one settings loader: flags, then variables, then defaults; every refusal names the
flag, the value and the variable it came from; every service reads its log level."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Literal

import msgspec
import pytest

from libshared import settings
from libshared.resources import ResourceSettings
from services.admission import settings as admission
from services.metrics import settings as metrics
from services.nodeagent import settings as nodeagent
from services.scheduler import settings as scheduler
from services.scheduler.core import committing


def _even(value: int) -> None:
    if value % 2:
        raise ValueError("must be even")


class Demo(msgspec.Struct, frozen=True, kw_only=True):
    port: Annotated[
        int, msgspec.Meta(ge=0, le=65535), settings.option("--port", env="DEMO_PORT")
    ] = 80
    ttl: Annotated[float, msgspec.Meta(gt=0), settings.option("--ttl", env="DEMO_TTL_S")] = 1.5
    mode: Annotated[
        Literal["fast", "safe"], settings.option("--mode", env="DEMO_MODE", help="how")
    ] = "safe"
    node: Annotated[str, settings.option("--node", env=("DEMO_NODE", "NODE_NAME"))] = ""
    pairs: Annotated[int, settings.option("--pairs", check=_even)] = 2
    loud: Annotated[bool, settings.option("--loud", env="DEMO_LOUD")] = False
    explain: Annotated[bool, settings.option("--no-explain", env="DEMO_EXPLAIN")] = True
    limit_mib: Annotated[int, msgspec.Meta(ge=1)] | None = None


LOADER = settings.Loader(Demo, prog="demo")


def test_a_flag_wins_over_its_variable_which_wins_over_the_default() -> None:
    env = {"DEMO_PORT": "8080", "DEMO_TTL_S": "2.5"}
    assert LOADER.load([], {}) == Demo()
    from_env = LOADER.load([], env)
    assert (from_env.port, from_env.ttl) == (8080, 2.5)
    flagged = LOADER.load(["--port", "9090"], env)
    assert (flagged.port, flagged.ttl) == (9090, 2.5)


def test_a_number_may_come_with_spaces_around_it() -> None:
    assert LOADER.load([], {"DEMO_PORT": " 8443\n"}).port == 8443
    assert LOADER.load(["--ttl", " 2.5"], {}).ttl == 2.5


def test_an_empty_variable_counts_as_unset_and_the_first_of_two_variables_wins() -> None:
    assert LOADER.load([], {"DEMO_PORT": ""}).port == 80
    assert LOADER.load([], {"NODE_NAME": "a"}).node == "a"
    assert LOADER.load([], {"NODE_NAME": "a", "DEMO_NODE": "b"}).node == "b"


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        ([], {}, (False, True)),
        (["--loud", "--no-explain"], {}, (True, False)),
        ([], {"DEMO_LOUD": "yes", "DEMO_EXPLAIN": "0"}, (True, False)),
        ([], {"DEMO_LOUD": "off", "DEMO_EXPLAIN": "TRUE"}, (False, True)),
    ],
)
def test_a_boolean_is_a_switch_and_its_variable_reads_on_or_off(
    argv: list[str], env: dict[str, str], expected: tuple[bool, bool]
) -> None:
    loaded = LOADER.load(argv, env)
    assert (loaded.loud, loaded.explain) == expected


@pytest.mark.parametrize(
    ("argv", "env", "flag", "value", "from_env", "message"),
    [
        (["--port", "70000"], {}, "--port", 70000, "", "--port 70000: Expected `int` <= 65535"),
        (
            [],
            {"DEMO_PORT": "http"},
            "--port",
            "http",
            "DEMO_PORT",
            "--port 'http' (from DEMO_PORT): Expected `int`, got `str`",
        ),
        (["--ttl", "0"], {}, "--ttl", 0.0, "", "--ttl 0.0: Expected `float` > 0.0"),
        (
            [],
            {"DEMO_MODE": "reckless"},
            "--mode",
            "reckless",
            "DEMO_MODE",
            "--mode 'reckless' (from DEMO_MODE): Invalid enum value 'reckless'",
        ),
        (["--pairs", "3"], {}, "--pairs", 3, "", "--pairs 3: must be even"),
        (["--limit-mib", "0"], {}, "--limit-mib", 0, "", "--limit-mib 0: Expected `int` >= 1"),
    ],
)
def test_a_refused_value_names_its_flag_its_value_and_its_variable(
    argv: list[str],
    env: dict[str, str],
    flag: str,
    value: object,
    from_env: str,
    message: str,
) -> None:
    with pytest.raises(settings.SettingsError) as caught:
        LOADER.load(argv, env)
    assert (caught.value.flag, caught.value.value, caught.value.env) == (flag, value, from_env)
    assert str(caught.value) == message


def test_a_value_outside_a_flags_choices_is_refused_by_the_command_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        LOADER.load(["--mode", "reckless"], {})
    assert exited.value.code == 2
    assert "invalid choice: 'reckless'" in capsys.readouterr().err


def test_parse_exits_2_with_the_refusal_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        LOADER.parse([], {"DEMO_TTL_S": "-1"})
    assert exited.value.code == 2
    assert "--ttl -1.0 (from DEMO_TTL_S): Expected `float` > 0.0" in capsys.readouterr().err


def test_help_names_every_flag_with_its_variables(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        LOADER.load(["--help"], {})
    shown = " ".join(capsys.readouterr().out.split())
    for needle in ("--port", "(env DEMO_PORT)", "(env DEMO_NODE, else NODE_NAME)", "--no-explain"):
        assert needle in shown


def test_a_switch_on_by_default_needs_a_no_flag() -> None:
    class Wrong(msgspec.Struct, frozen=True):
        explain: Annotated[bool, settings.option("--explain")] = True

    with pytest.raises(TypeError, match="--no-"):
        settings.Loader(Wrong, prog="wrong")


def test_a_client_certificate_without_its_key_is_refused_naming_both_flags() -> None:
    opts = settings.Loader(settings.ServiceOptions, prog="svc").load(
        ["--nats-tls-cert", "/c.pem"], {}
    )
    with pytest.raises(settings.SettingsError, match="--nats-tls-cert and --nats-tls-key"):
        opts.bus()


SERVICES: dict[str, Callable[[Sequence[str], Mapping[str, str]], Any]] = {
    "admission": admission.parse,
    "scheduler": scheduler.parse,
    "nodeagent": nodeagent.parse,
    "metrics": metrics.parse,
}


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_every_service_reads_its_log_level_from_the_flag_or_vslice_log_level(
    service: str,
) -> None:
    parse = SERVICES[service]
    assert parse([], {}).log_level == "info"
    env = {"VSLICE_LOG_LEVEL": "warning,vslice.decisions=error"}
    assert parse([], env).log_level == "warning,vslice.decisions=error"
    assert parse(["--log-level", "debug"], env).log_level == "debug"


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_every_service_refuses_a_bad_log_level_naming_it(
    service: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        SERVICES[service]([], {"VSLICE_LOG_LEVEL": "chatty"})
    assert exited.value.code == 2
    assert "--log-level 'chatty' (from VSLICE_LOG_LEVEL)" in capsys.readouterr().err


# Each default is written once (in the service's options, or the core rule they name): a
# service started with no flag and no variable runs with exactly its settings object's
# defaults. The mock fleet's node names are the host's, by design, not FleetSpec's "mock".
@pytest.mark.parametrize("service", [admission, metrics, nodeagent, scheduler])
def test_a_service_with_no_flag_and_no_variable_runs_on_its_settings_defaults(
    service: Any,
) -> None:
    parsed, default = service.parse([], {}), service.Settings()
    if service is nodeagent:
        parsed = dataclasses.replace(
            parsed, spec=dataclasses.replace(parsed.spec, name_prefix=default.spec.name_prefix)
        )
    assert parsed == default


def test_the_replicas_defaults_are_the_commit_protocols_rules() -> None:
    rules, replica = committing.Rules(), scheduler.Settings()
    assert (rules.max_attempts, rules.claim_wait_s, rules.sync_timeout_s) == (
        replica.max_attempts,
        replica.claim_wait_s,
        replica.sync_timeout_s,
    )
    assert (rules.max_in_flight, rules.explain) == (replica.max_in_flight, replica.explain)
    assert scheduler.parse(["--sync-timeout", "0.5"], {}).sync_timeout_s == 0.5


def test_the_scheduler_and_the_webhook_read_the_resource_model_from_the_same_variables() -> None:
    env = {
        "VSLICE_DEFAULT_MEMORY_MIB": "2048",
        "VSLICE_DEFAULT_CORES": "20",
        "VSLICE_DEFAULT_GPU_NUM": "2",
        "VSLICE_DCU_MEMORY_FACTOR": "8",
    }
    want = ResourceSettings(
        default_memory_mib=2048, default_cores_percent=20, default_gpu_num=2, dcu_memory_factor=8
    )
    assert scheduler.parse([], env).resources == want
    assert admission.parse([], env).resources == want
    assert scheduler.parse(["--dcu-memory-factor", "4"], env).resources.dcu_memory_factor == 4
