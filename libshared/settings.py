"""One settings loader for every service: a msgspec Struct of options, from flags, then the
environment, then the field's default.

A service declares its options once, as a frozen msgspec ``Struct`` whose fields carry
their type, bounds (``msgspec.Meta(ge=..., le=...)``), default, and an ``option(...)``
naming the flag, the environment variable(s) and the help line. ``Loader`` turns that into
an ``argparse`` command line (``--help`` lists every flag with its variable), reads each
value from the flag when given, else from the first variable set (an empty one counts as
unset), else leaves the field's default, and converts and validates them all with
``msgspec.convert``: a value that fails is refused as ``SettingsError`` naming the flag,
the value and, when it came from the environment, the variable
(``--port 70000: Expected `int` <= 65535``). Booleans are switches: ``--flag`` turns on a
field that defaults off (``--no-flag`` turns off one that defaults on), and their variable
is on for ``1``/``true``/``yes``/``on`` (``connecting.env_flag``).

``ServiceOptions`` holds what every service reads: the bus (``connecting.BusSettings``)
and the log level (``libshared.logs``). What it leaves to the services: the frozen settings
objects they pass around, built from their options, and the checks that join two options.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Generic, NoReturn, TypeVar

import msgspec

from libshared import connecting, heartbeats, logs, permissions, probes, resources
from libshared.errors import VsliceError
from libshared.subjects import DEFAULT_PREFIX

T = TypeVar("T", bound=msgspec.Struct)
_PATH = re.compile(r"^(?P<reason>.*) - at `\$\.(?P<field>\w+)")


class SettingsError(VsliceError, ValueError):
    """A setting's value refused: ``flag`` (the option's flag), ``value`` (as given),
    ``env`` (the variable it came from; ``""`` when it came from the command line or a
    check of two options), ``reason``."""

    def __init__(self, *, flag: str, value: object, reason: str, env: str = "") -> None:
        self.flag, self.value, self.env, self.reason = flag, value, env, reason
        shown = value if isinstance(value, (int, float)) else repr(value)
        source = f" (from {env})" if env else ""
        super().__init__(f"{flag} {shown}{source}: {reason}")


def option(
    flag: str,
    *,
    env: str | tuple[str, ...] = (),
    help: str = "",
    group: str = "",
    check: Callable[[Any], object] | None = None,
) -> msgspec.Meta:
    """The ``Annotated`` metadata of one option: its ``flag``, the variable(s) read when
    the flag is absent (the first set wins), its ``help`` line and ``group`` in ``--help``,
    and ``check``, a function of the converted value that raises ``ValueError`` to refuse
    it (its message becomes the reason)."""
    names = (env,) if isinstance(env, str) else tuple(env)
    return msgspec.Meta(
        description=help, extra={"flag": flag, "env": names, "group": group, "check": check}
    )


@dataclass(frozen=True)
class _Option:
    name: str
    flag: str
    env: tuple[str, ...]
    help: str
    group: str
    switch: bool  # a boolean: a flag without a value
    default: object
    choices: tuple[str, ...] | None
    check: Callable[[Any], object] | None
    number: type[int] | type[float] | None  # the option's type when it is a number


class Loader(Generic[T]):
    """Reads options of type ``spec`` (a msgspec Struct: see the module docstring) for
    the program ``prog``. ``parser`` is the ``argparse`` parser it built.

    Raises ``TypeError`` for a spec whose boolean option defaults on but whose flag does
    not start with ``--no-``.
    """

    def __init__(self, spec: type[T], *, prog: str, description: str = "") -> None:
        self.spec = spec
        self.parser = argparse.ArgumentParser(prog=prog, description=description)
        self.options = [_describe(field, spec) for field in _fields(spec)]
        groups: dict[str, argparse._ArgumentGroup] = {}
        for opt in self.options:
            target: argparse._ActionsContainer = self.parser
            if opt.group:
                target = groups.get(opt.group) or self.parser.add_argument_group(opt.group)
                groups[opt.group] = target
            helped = opt.help + (f" (env {', else '.join(opt.env)})" if opt.env else "")
            helped = helped.strip().replace("%", "%%")  # argparse %-formats help
            if opt.switch:
                action = "store_false" if opt.default else "store_true"
                target.add_argument(
                    opt.flag, dest=opt.name, action=action, default=None, help=helped or None
                )
            else:
                target.add_argument(
                    opt.flag,
                    dest=opt.name,
                    default=None,
                    choices=opt.choices,
                    help=helped + (f" [default: {opt.default}]" if opt.default else ""),
                )

    def load(self, argv: Sequence[str] | None, environ: Mapping[str, str]) -> T:
        """The options from ``argv`` (flags win) and ``environ``.

        Raises ``SettingsError`` naming the first option whose value is refused, and
        ``SystemExit`` (2, argparse's) for an unknown flag, a missing value or a value
        outside a flag's choices.
        """
        args = vars(self.parser.parse_args(list(argv or [])))
        raw: dict[str, object] = {}
        came_from: dict[str, str] = {}
        for opt in self.options:
            given = args.get(opt.name)
            if given is None:
                for name in opt.env:
                    if environ.get(name, ""):
                        given = environ[name]
                        came_from[opt.name] = name
                        given = connecting.env_flag(environ, name) if opt.switch else given
                        break
            if isinstance(given, str) and opt.number is not None:
                given = given.strip()  # " 8443" from a manifest is a port, as int() reads it
            if given is not None:
                raw[opt.name] = given
        try:
            loaded = msgspec.convert(raw, self.spec, strict=False)
        except msgspec.ValidationError as exc:
            match = _PATH.match(str(exc))
            if match is None or match["field"] not in raw:
                raise SettingsError(flag=self.parser.prog, value=raw, reason=str(exc)) from exc
            field = match["field"]
            raise SettingsError(
                flag=self._flag(field),
                value=self._shown(field, raw[field]),
                reason=match["reason"],
                env=came_from.get(field, ""),
            ) from exc
        for opt in self.options:
            if opt.check is not None and opt.name in raw:
                value = getattr(loaded, opt.name)
                try:
                    opt.check(value)
                except ValueError as exc:
                    raise SettingsError(
                        flag=opt.flag,
                        value=self._shown(opt.name, raw[opt.name]),
                        reason=str(exc),
                        env=came_from.get(opt.name, ""),
                    ) from exc
        return loaded

    def parse(self, argv: Sequence[str] | None, environ: Mapping[str, str]) -> T:
        """``load``, exiting (``SystemExit`` 2, with the usage and the error on stderr)
        where it raises ``SettingsError``."""
        try:
            return self.load(argv, environ)
        except SettingsError as exc:
            self.error(str(exc))

    def error(self, message: str) -> NoReturn:
        """Exit 2 with the usage and ``message`` on stderr (for checks of two options)."""
        self.parser.error(message)

    def _flag(self, field: str) -> str:
        return next(o.flag for o in self.options if o.name == field)

    def _shown(self, field: str, value: object) -> object:
        """``value`` as its option's number type when it reads as one (``0`` of a float
        option shows as ``0.0``), else as given."""
        kind = next(o.number for o in self.options if o.name == field)
        if kind is None:
            return value
        try:
            return msgspec.convert(value, kind, strict=False)
        except msgspec.ValidationError:
            return value


def _fields(spec: type[msgspec.Struct]) -> tuple[msgspec.inspect.Field, ...]:
    info = msgspec.inspect.type_info(spec)
    assert isinstance(info, msgspec.inspect.StructType)
    return info.fields


def _describe(field: msgspec.inspect.Field, spec: type[msgspec.Struct]) -> _Option:
    extra: dict[str, Any] = {}
    help_ = ""
    kind: msgspec.inspect.Type = field.type
    if isinstance(kind, msgspec.inspect.Metadata):
        extra = dict(kind.extra or {})
        help_ = str((kind.extra_json_schema or {}).get("description", ""))
        kind = kind.type
    flag = str(extra.get("flag") or "--" + field.name.replace("_", "-"))
    switch = isinstance(kind, msgspec.inspect.BoolType)
    default = field.default if field.default is not msgspec.NODEFAULT else None
    if switch and default and not flag.startswith("--no-"):
        raise TypeError(f"{spec.__name__}.{field.name}: on by default, its flag must be --no-…")
    return _Option(
        name=field.name,
        flag=flag,
        env=tuple(extra.get("env") or ()),
        help=help_,
        group=str(extra.get("group") or ""),
        switch=switch,
        default=default,
        choices=_choices(kind),
        check=extra.get("check"),
        number=_number(kind),
    )


def _number(kind: msgspec.inspect.Type) -> type[int] | type[float] | None:
    if isinstance(kind, msgspec.inspect.UnionType):
        numbers = [t for t in kind.types if not isinstance(t, msgspec.inspect.NoneType)]
        kind = numbers[0] if len(numbers) == 1 else kind
    if isinstance(kind, msgspec.inspect.IntType):
        return int
    if isinstance(kind, msgspec.inspect.FloatType):
        return float
    return None


def _choices(kind: msgspec.inspect.Type) -> tuple[str, ...] | None:
    if isinstance(kind, msgspec.inspect.UnionType):
        literals = [t for t in kind.types if isinstance(t, msgspec.inspect.LiteralType)]
        kind = literals[0] if len(literals) == 1 else kind
    if isinstance(kind, msgspec.inspect.LiteralType):
        return tuple(str(v) for v in kind.values)
    return None


def _bus_settings(options: ServiceOptions) -> connecting.BusSettings:
    urls = tuple(u.strip() for u in (options.nats_url or "").split(",") if u.strip())
    return connecting.BusSettings(
        urls=urls or (connecting.DEFAULT_URL,),
        prefix=options.prefix,
        replicas=options.replicas,
        heartbeat_s=options.heartbeat_s,
        identity=options.identity,
        nkey_seed_path=options.nkey_seed,
        creds_path=options.nats_creds,
        tls_ca_path=options.nats_tls_ca,
        tls_cert_path=options.nats_tls_cert,
        tls_key_path=options.nats_tls_key,
    )


def _prefix(value: str) -> None:
    _ = connecting.BusSettings(prefix=value).subjects  # raises ValueError naming it


def _identity(value: str) -> None:
    if value:
        permissions.inbox_prefix(value)


Text = Annotated[str, msgspec.Meta(max_length=4096)]


class ServiceOptions(msgspec.Struct, frozen=True, kw_only=True):
    """The options every service reads: where the bus is and who connects
    (``connecting.BusSettings``), and the log level (``logs.parse_levels``).
    ``nats_url``: ``None`` when neither the flag nor ``VSLICE_NATS_URL`` gave one."""

    nats_url: Annotated[
        str | None,
        option(
            "--nats-url",
            env="VSLICE_NATS_URL",
            help=f"NATS URL(s), comma-separated; default {connecting.DEFAULT_URL}",
        ),
    ] = None
    prefix: Annotated[
        str,
        option("--prefix", env="VSLICE_PREFIX", help="subject and bucket prefix", check=_prefix),
    ] = DEFAULT_PREFIX
    replicas: Annotated[
        int,
        msgspec.Meta(ge=1, le=5),
        option(
            "--replicas",
            env="VSLICE_BUCKET_REPLICAS",
            help="JetStream replicas of buckets and streams created (1-5)",
        ),
    ] = 1
    heartbeat_s: Annotated[
        float,
        msgspec.Meta(ge=heartbeats.MIN_INTERVAL_S, le=heartbeats.MAX_INTERVAL_S),
        option(
            "--heartbeat-s",
            env="VSLICE_HEARTBEAT_S",
            help="seconds between the service's heartbeats",
        ),
    ] = heartbeats.DEFAULT_INTERVAL_S
    identity: Annotated[
        Text,
        option(
            "--identity",
            env="VSLICE_IDENTITY",
            help="bus identity (inbox prefix); default: seed file stem",
            check=_identity,
        ),
    ] = ""
    nkey_seed: Annotated[
        Text,
        option(
            "--nkey-seed", env="VSLICE_NKEY_SEED", help="NKEY seed file of this service's identity"
        ),
    ] = ""
    nats_creds: Annotated[
        Text,
        option("--nats-creds", env="VSLICE_NATS_CREDS", help="NATS credentials file (JWT + seed)"),
    ] = ""
    nats_tls_ca: Annotated[
        Text,
        option(
            "--nats-tls-ca",
            env="VSLICE_NATS_TLS_CA",
            help="CA certificate of the NATS server (turns TLS on)",
        ),
    ] = ""
    nats_tls_cert: Annotated[
        Text,
        option(
            "--nats-tls-cert",
            env="VSLICE_NATS_TLS_CERT",
            help="client certificate (if the server asks)",
        ),
    ] = ""
    nats_tls_key: Annotated[
        Text,
        option("--nats-tls-key", env="VSLICE_NATS_TLS_KEY", help="client certificate's key"),
    ] = ""
    log_level: Annotated[
        str,
        option(
            "--log-level",
            env="VSLICE_LOG_LEVEL",
            help="LEVEL[,LOGGER=LEVEL...], e.g. info,vslice.decisions=warning",
            check=logs.check_levels,
        ),
    ] = "info"
    health_port: Annotated[
        int,
        msgspec.Meta(ge=0, le=65535),
        option(
            "--health-port",
            env="VSLICE_HEALTH_PORT",
            help="serve /healthz and /readyz over HTTP on this port; 0 = off",
            group="health",
        ),
    ] = 0
    health_host: Annotated[
        Text,
        option(
            "--health-host",
            env="VSLICE_HEALTH_HOST",
            help="address of /healthz and /readyz (0.0.0.0 in a pod)",
            group="health",
        ),
    ] = "127.0.0.1"

    def health(self) -> probes.HealthSettings:
        """Where ``/healthz`` and ``/readyz`` are served (``libshared.probes``)."""
        return probes.HealthSettings(port=self.health_port, host=self.health_host)

    def bus(self) -> connecting.BusSettings:
        """The ``BusSettings`` of these options (``connecting.DEFAULT_URL`` when no URL was
        given). Raises ``SettingsError`` when only one of the client certificate and its
        key is given."""
        if bool(self.nats_tls_cert) != bool(self.nats_tls_key):
            raise SettingsError(
                flag="--nats-tls-cert",
                value=self.nats_tls_cert,
                reason="--nats-tls-cert and --nats-tls-key: give both or neither",
            )
        return _bus_settings(self)


_MODEL = resources.ResourceSettings()  # the resource model's defaults (HAMi's), written there
MODEL_GROUP = "resource model (HAMi's scheduler flags)"


class ResourceOptions(ServiceOptions, frozen=True, kw_only=True):
    """``ServiceOptions`` and the resource model's defaults, for the services that parse
    pods (``libshared.resources.ResourceSettings``): the webhook and, in Kubernetes, the
    scheduler's extender, which parses the pods kube-scheduler hands it. Both read the same
    variables, so one ConfigMap sets them for both (HAMi's scheduler flags
    ``defaultMem``, ``defaultCores``, ``defaultGPUNum`` and Hygon's ``memoryFactor``)."""

    default_memory_mib: Annotated[
        int,
        msgspec.Meta(ge=0),
        option(
            "--default-memory-mib",
            env="VSLICE_DEFAULT_MEMORY_MIB",
            help="MiB of a slice naming no memory (0: the whole card)",
            group=MODEL_GROUP,
        ),
    ] = _MODEL.default_memory_mib
    default_cores: Annotated[
        int,
        msgspec.Meta(ge=0, le=100),
        option(
            "--default-cores",
            env="VSLICE_DEFAULT_CORES",
            help="cores (percent) of a slice naming memory but no cores",
            group=MODEL_GROUP,
        ),
    ] = _MODEL.default_cores_percent
    default_gpu_num: Annotated[
        int,
        msgspec.Meta(ge=0),
        option(
            "--default-gpu-num",
            env="VSLICE_DEFAULT_GPU_NUM",
            help="GPUs of a container naming gpumem or gpucores but no nvidia.com/gpu",
            group=MODEL_GROUP,
        ),
    ] = _MODEL.default_gpu_num
    dcu_memory_factor: Annotated[
        int,
        msgspec.Meta(ge=1, le=1024),
        option(
            "--dcu-memory-factor",
            env="VSLICE_DCU_MEMORY_FACTOR",
            help="HAMi's Hygon memoryFactor: a hygon.com/dcumem request counts this many MiB"
            " per unit (1 = MiB)",
            group=MODEL_GROUP,
        ),
    ] = _MODEL.dcu_memory_factor

    def resource_settings(self) -> resources.ResourceSettings:
        """The ``ResourceSettings`` of these options."""
        return resources.ResourceSettings(
            default_memory_mib=self.default_memory_mib,
            default_cores_percent=self.default_cores,
            default_gpu_num=self.default_gpu_num,
            dcu_memory_factor=self.dcu_memory_factor,
        )
