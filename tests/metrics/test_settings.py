"""The metrics service's settings: flags win over the environment; bad values exit with a
message naming the flag."""

from __future__ import annotations

import pytest

from services.metrics import settings


def test_flags_win_over_the_environment_and_every_field_has_a_default() -> None:
    env = {"VSLICE_METRICS_PORT": "9500", "VSLICE_METRICS_HOST": "10.0.0.1", "VSLICE_PREFIX": "p"}
    from_env = settings.parse([], env)
    assert (from_env.host, from_env.port, from_env.bus.prefix) == ("10.0.0.1", 9500, "p")
    flagged = settings.parse(["--port", "0", "--no-observe-requests", "--usage-ttl", "5"], env)
    assert (flagged.port, flagged.observe_requests, flagged.usage_ttl_s) == (0, False, 5.0)
    assert settings.parse([], {}) == settings.Settings()


@pytest.mark.parametrize(
    ("argv", "env", "legacy"),
    [
        ([], {}, False),
        (["--legacy-metrics"], {}, True),
        ([], {"VSLICE_LEGACY_METRICS": "true"}, True),
        ([], {"VSLICE_LEGACY_METRICS": "0"}, False),
    ],
)
def test_hamis_legacy_metric_names_are_off_unless_asked_for(
    argv: list[str], env: dict[str, str], legacy: bool
) -> None:
    assert settings.parse(argv, env).legacy_metrics is legacy


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--port", "70000"], "--port 70000"),
        (["--usage-ttl", "0"], "--usage-ttl 0"),
        (["--stats-interval", "-1"], "--stats-interval -1"),
        (["--prefix", "a.b"], "prefix 'a.b'"),
    ],
)
def test_a_bad_value_exits_naming_the_flag_and_value(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        settings.parse(argv, {})
    assert exited.value.code == 2
    assert needle in capsys.readouterr().err
