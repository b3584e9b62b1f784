"""``compose/docker-compose.yaml`` runs what ``vslice up`` runs: each service's command is
the stack's command for that module, with the same flags (host names aside)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.bus.conftest import repo_root
from vslice import stacks

COMPOSE = repo_root() / "compose" / "docker-compose.yaml"
# differ between a host and a container
HOST_VALUED = {"--nats-url", "--node-prefix", "--name", "--host"}


def flags(argv: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for i, word in enumerate(argv):
        if word.startswith("--"):
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            out[word] = None if nxt is None or nxt.startswith("--") else nxt
    return out


def test_every_compose_service_runs_a_command_of_vslice_up() -> None:
    spec: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    services = spec["services"]
    assert set(services) == {"nats", "admission", "scheduler", "nodeagent", "metrics"}
    assert "--jetstream" in services["nats"]["command"]
    assert services["scheduler"]["deploy"]["replicas"] == 2
    up = stacks.service_commands(
        "nats://127.0.0.1:4222", agent_args=stacks.mock_agent_args({}), metrics_port=9394
    )
    by_module = {argv[2]: argv for argv in up.values()}
    for name in ("admission", "scheduler", "nodeagent", "metrics"):
        command = services[name]["command"]
        assert command[:2] == ["python", "-m"] and command[2] == f"services.{name}"
        ours = flags(by_module[command[2]])
        theirs = flags(command)
        assert set(theirs) - {"--name"} == set(ours) - {"--name"}, name
        for flag, value in theirs.items():
            if flag not in HOST_VALUED:
                assert ours[flag] == value, (name, flag)
        assert theirs["--nats-url"] == "nats://nats:4222"


def test_the_dockerfile_installs_the_packages_the_services_run_from() -> None:
    text = (Path(COMPOSE).parent / "Dockerfile").read_text()
    for package in ("libshared", "services", "vslice"):
        assert f"COPY {package} {package}" in text
    assert "pip install" in text and "USER " in text
