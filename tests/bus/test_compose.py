"""``compose/docker-compose.yaml`` is a valid compose file -- Debian's ``docker-compose config``
renders it (no Docker engine needed) -- with the stack of ``ARCHITECTURE.md``: NATS with
JetStream, admission, two scheduler replicas, a mock node agent and metrics, each vslice
service built from the one Dockerfile, running a command that ``vslice up`` also runs (host
names aside; the replicas' seeds drawn from their names), with a healthcheck on its
``/readyz``; ``.dockerignore`` keeps the virtual environment, builds and history out of the
image."""

from __future__ import annotations

import fnmatch
import importlib
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from libshared.natsserver import NatsServer
from tests.bus.conftest import repo_root
from vslice import stacks

COMPOSE = repo_root() / "compose" / "docker-compose.yaml"
# differ between a host and a container
HOST_VALUED = {
    "--nats-url",
    "--node-prefix",
    "--name",
    "--host",
    "--identity",
    "--nkey-seed",
    "--nats-tls-ca",
    # `vslice up` numbers its replicas' seeds; compose's replicas share one command, so
    # each draws its seed from its container's name (`auto`)
    "--seed",
    # and its replica index likewise (`auto`): `vslice up` numbers them 0 .. replicas - 1
    "--replica-index",
}
SERVICES = ("admission", "scheduler", "nodeagent", "metrics")


def targets(volumes: list[Any]) -> dict[str, str]:
    """Mount target -> mode ("ro"/"rw") of a service's rendered volumes (short or long)."""
    out = {}
    for v in volumes:
        if isinstance(v, dict):
            out[str(v["target"])] = "ro" if v.get("read_only") else "rw"
        else:
            parts = str(v).split(":")
            out[parts[1]] = parts[2] if len(parts) > 2 else "rw"
    return out


def flags(argv: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for i, word in enumerate(argv):
        if word.startswith("--"):
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            out[word] = None if nxt is None or nxt.startswith("--") else nxt
    return out


def same_command(ours: list[str], theirs: list[str]) -> bool:
    """The same module with the same flags and values, host-valued ones and names aside."""
    if ours[2] != theirs[2]:
        return False
    a, b = flags(ours), flags(theirs)
    if set(a) - {"--name"} != set(b) - {"--name"}:
        return False
    return all(a[f] == v for f, v in b.items() if f not in HOST_VALUED)


@pytest.fixture(scope="module")
def rendered() -> dict[str, Any]:
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.fail("docker-compose is not installed: `make compose-tool` installs Debian's")
    done = subprocess.run(
        [tool, "-f", str(COMPOSE), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"docker-compose config failed:\n{done.stderr}"
    spec: dict[str, Any] = yaml.safe_load(done.stdout)
    return spec


def test_docker_compose_renders_nats_with_jetstream_and_every_vslice_service(
    rendered: dict[str, Any],
) -> None:
    services = rendered["services"]
    assert set(services) == {"certs", "nats", *SERVICES}
    nats = services["nats"]["command"]
    assert nats == ["--config", "/trust/nats.conf"]  # written by the certs service
    certs = flags([str(w) for w in services["certs"]["command"]])
    store = certs["--store-dir"]
    assert store in targets(services["nats"]["volumes"])  # kept
    assert services["nats"]["depends_on"]["certs"]["condition"] == (
        "service_completed_successfully"
    )
    for port in services["nats"]["ports"]:  # the bus is reachable from this host only
        assert str(port).startswith("127.0.0.1:"), port
    assert services["scheduler"]["deploy"]["replicas"] == 2
    for name in SERVICES:
        assert "nats" in services[name]["depends_on"], name
        assert services[name]["image"] == "ghcr.io/vslice/vslice:0.1.0"
        command = flags([str(w) for w in services[name]["command"]])
        identity = command["--identity"]
        assert command["--nkey-seed"] == f"/trust/nkeys/{identity}.nk", name
        assert command["--nats-tls-ca"] == "/trust/ca.pem", name
        assert targets(services[name]["volumes"]).get("/trust") == "ro", name
    assert services["admission"]["build"]["dockerfile"] == "compose/Dockerfile"
    assert Path(services["admission"]["build"]["context"]) == repo_root()
    agent = flags(services["nodeagent"]["command"])
    assert "--host-root" not in agent and agent["--gpus"] == "2"  # mock nodes only
    ports = services["metrics"]["ports"]
    assert [str(p).split("/")[0] for p in ports] == ["127.0.0.1:9394:9394"]


def test_every_compose_service_runs_a_command_of_vslice_up(
    rendered: dict[str, Any], tmp_path: Path
) -> None:
    server = NatsServer(data_dir=tmp_path, port=4222, http_port=8222)
    credentials = stacks.provision(server, prefix="vslice", node="compose-node-0")
    up = stacks.service_commands(
        "nats://127.0.0.1:4222",
        credentials=credentials,
        agent_args=stacks.mock_agent_args({}),
        metrics_port=9394,
    )
    for name in SERVICES:
        command = [str(word) for word in rendered["services"][name]["command"]]
        assert command[:3] == ["python", "-m", f"services.{name}"], command
        assert flags(command)["--nats-url"] == "nats://nats:4222"
        assert any(same_command(argv, command) for argv in up.values()), (name, command)


def test_a_compose_command_that_differs_from_vslice_up_is_caught() -> None:
    up = stacks.service_commands("nats://127.0.0.1:4222")
    ours = up["scheduler-1"]
    assert same_command(ours, ["python", "-m", *ours[2:]])
    assert not same_command(ours, ["python", "-m", *ours[2:], "--max-attempts", "3"])
    changed = [*ours[:-1], "--explain"] if ours[-1] == "--no-explain" else [*ours, "--x"]
    assert not same_command(ours, changed)
    assert not same_command(ours, ["python", "-m", "services.admission", *ours[3:]])


def test_the_dockerfile_installs_the_packages_the_services_run_from() -> None:
    text = (Path(COMPOSE).parent / "Dockerfile").read_text()
    for package in ("libshared", "services", "vslice"):
        assert f"COPY {package} {package}" in text
    assert "pip install" in text and "USER " in text


def test_every_vslice_service_builds_the_one_image_from_the_dockerfile(
    rendered: dict[str, Any],
) -> None:
    services = rendered["services"]
    for name in ("certs", *SERVICES):
        build = services[name]["build"]
        assert build["dockerfile"] == "compose/Dockerfile", name
        assert Path(build["context"]) == repo_root(), name
        assert services[name]["image"] == "ghcr.io/vslice/vslice:0.1.0", name


def test_the_scheduler_replicas_draw_their_seeds_from_their_names(
    rendered: dict[str, Any],
) -> None:
    command = flags([str(w) for w in rendered["services"]["scheduler"]["command"]])
    assert command["--seed"] == "auto"
    assert "--name" not in command  # each replica is named after its container


def test_every_service_has_a_healthcheck_on_its_http_health_endpoint(
    rendered: dict[str, Any],
) -> None:
    services = rendered["services"]
    for name in SERVICES:
        env = services[name]["environment"]
        port = int(env["VSLICE_HEALTH_PORT"])
        check = services[name]["healthcheck"]
        assert check["test"][0] == "CMD", name
        assert f"http://127.0.0.1:{port}/readyz" in " ".join(check["test"]), name
        assert env["VSLICE_HEALTH_HOST"] == "127.0.0.1", name  # probed from inside
        assert services[name]["depends_on"]["nats"]["condition"] == "service_healthy", name
    nats = services["nats"]["healthcheck"]["test"]
    assert "http://127.0.0.1:8222/healthz" in nats  # nats.conf's monitoring port (vslice certs)
    assert services["nats"]["image"].endswith("-alpine")  # wget for it


@pytest.mark.parametrize("service", SERVICES)
def test_each_services_parser_takes_the_compose_health_environment(
    rendered: dict[str, Any], service: str
) -> None:
    parse = importlib.import_module(f"services.{service}.settings").parse
    command = [str(w) for w in rendered["services"][service]["command"]][3:]
    settings = parse(command, dict(rendered["services"][service]["environment"]))
    assert settings.health.port == 8080
    assert settings.health.host == "127.0.0.1"


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker's ``.dockerignore`` rules (the last matching line wins, ``!`` keeps,
    ``**`` spans directories, a directory takes what is under it) leave ``path`` out."""
    out = False
    for pattern in patterns:
        keep = pattern.startswith("!")
        pattern = pattern.removeprefix("!").strip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        candidates = [pattern, pattern.replace("**/", "")]
        if any(fnmatch.fnmatchcase(p, c) for p in prefixes for c in candidates):
            out = not keep
    return out


def test_the_dockerignore_keeps_builds_and_the_venv_out_and_the_sources_in() -> None:
    lines = (repo_root() / ".dockerignore").read_text().splitlines()
    patterns = [x.strip() for x in lines if x.strip() and not x.startswith("#")]
    for path in (
        ".git/HEAD",
        ".venv/bin/python",
        "services/nodeagent/libvgpu/libvgpu.so",
        "services/nodeagent/mockgpu/libcuda.so.1",
        "services/nodeagent/libvgpu/build/probe",
        "libshared/__pycache__/x.cpython-311.pyc",
        "vslice.egg-info/PKG-INFO",
        "test-artifacts/a.png",
    ):
        assert _ignored(path, patterns), path
    dockerfile = (repo_root() / "compose" / "Dockerfile").read_text()
    copied = [
        source
        for line in dockerfile.splitlines()
        if line.startswith("COPY ") and "--from" not in line
        for source in line.split()[1:-1]
    ]
    assert copied
    for source in copied:  # what the image copies, and a file inside each directory
        for path in (source, f"{source}/__init__.py", f"{source}/Makefile", f"{source}/memory.c"):
            assert not _ignored(path, patterns), path
