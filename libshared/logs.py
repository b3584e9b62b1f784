"""Structured logs: one JSON object a line on stderr, the same shape for every service.

Each record has ``ts`` (Unix seconds), ``level``, ``logger``, ``msg``, ``service`` and any
``extra={...}`` fields the caller passes (``exc`` holds a traceback). The JSON is written
by python-json-logger's formatter (the standard library's ``json``, so a line reads
``"msg": "stopped"`` as it always has): this module only names the fields.

Levels: ``setup``'s ``level`` is ``LEVEL`` or ``LEVEL,LOGGER=LEVEL,...`` (``parse_levels``),
so an operator can turn one kind of line down alone -- ``info,vslice.decisions=warning``
keeps the services' lines and drops the scheduler's per-decision lines
(``services.scheduler.adapters.decisions``). Every service reads it from ``--log-level``
or ``VSLICE_LOG_LEVEL``.

Repeated lines are collapsed by ``Collapse``: within a window, a line identical to one
shown (same logger, level, message and fields) is counted instead of written, and the
count is written once the window ends, as one line with ``"repeated": N``.

What it leaves to others: what is logged and at which level (each module's ``log``).
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter as LibraryJsonFormatter

LEVELS = ("debug", "info", "warning", "error", "critical")
COLLAPSE_WINDOW_S = 10.0  # how long identical lines are counted instead of written
COLLAPSE_MAX_KEYS = 1024  # distinct lines remembered at once (oldest forgotten first)
_FIELDS = ("created", "levelname", "name", "message")
_RENAMES = {
    "created": "ts",
    "levelname": "level",
    "name": "logger",
    "message": "msg",
    "exc_info": "exc",
}
_STANDARD = frozenset(RESERVED_ATTRS) | {"message", "asctime"}
_SUMMARY = "_vslice_collapse_summary"  # marks the count line Collapse itself sends


class JsonFormatter(LibraryJsonFormatter):
    """One JSON line per record, the shape of the module docstring; ``service`` is added
    to every line."""

    def __init__(self, service: str) -> None:
        super().__init__(
            list(_FIELDS), rename_fields=dict(_RENAMES), static_fields={"service": service}
        )
        self.service = service

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        """Unix seconds to the millisecond, and the level in lower case."""
        log_data["ts"] = round(float(log_data["ts"]), 3)
        log_data["level"] = str(log_data["level"]).lower()
        return log_data


def parse_levels(text: str) -> tuple[int, dict[str, int]]:
    """``LEVEL[,LOGGER=LEVEL...]`` (case ignored, spaces around items ignored) as the root
    level and a level per logger name, as ``logging`` numbers.

    Raises ``ValueError`` naming the item and the value when a level is not one of
    ``LEVELS`` or the root level is missing (``"info,vslice.decisions=warning"`` is
    ``(20, {"vslice.decisions": 30})``).
    """
    items = [item.strip() for item in text.split(",")]
    if not items[0] or "=" in items[0]:
        raise ValueError(f"log level {text!r}: must start with one of {', '.join(LEVELS)}")
    root = _level(items[0], text)
    loggers: dict[str, int] = {}
    for item in items[1:]:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"log level {text!r}: {item!r} is not LOGGER=LEVEL")
        loggers[name.strip()] = _level(value, text)
    return root, loggers


def _level(value: str, text: str) -> int:
    name = value.strip().lower()
    if name not in LEVELS:
        raise ValueError(f"log level {text!r}: {value!r} is not one of {', '.join(LEVELS)}")
    return logging.getLevelNamesMapping()[name.upper()]


def check_levels(text: str) -> str:
    """``text`` when ``parse_levels`` takes it; raises its ``ValueError`` otherwise (a
    settings validator)."""
    parse_levels(text)
    return text


@dataclass
class _Seen:
    first_s: float
    last_s: float
    suppressed: int = 0
    record: logging.LogRecord | None = None  # the latest suppressed one, for the count line


class Collapse(logging.Filter):
    """A handler filter that collapses repeated identical lines.

    The first line of a kind passes; identical ones (same logger, level, message and extra
    fields) within ``window_s`` seconds of it are counted and dropped. Once the window has
    ended -- checked on every record and by ``flush`` -- a kind with dropped lines is
    written once more, through ``send`` (the handler's ``handle``), as its latest line with
    ``repeated`` set to the number dropped and ``window_s`` to the seconds they spanned.
    Times are the records' own (``created``), so the filter reads no clock. At most
    ``max_keys`` kinds are remembered; the oldest is summarized and forgotten first.

    Raises ``ValueError`` for a ``window_s`` not above 0 or a ``max_keys`` below 1.
    """

    def __init__(
        self,
        *,
        window_s: float = COLLAPSE_WINDOW_S,
        send: Callable[[logging.LogRecord], object] | None = None,
        max_keys: int = COLLAPSE_MAX_KEYS,
    ) -> None:
        super().__init__()
        if not window_s > 0:
            raise ValueError(f"window_s {window_s}: must be above 0 seconds")
        if max_keys < 1:
            raise ValueError(f"max_keys {max_keys}: must be at least 1")
        self.window_s = window_s
        self.send = send
        self.max_keys = max_keys
        self._seen: dict[tuple[object, ...], _Seen] = {}
        self._lock = threading.RLock()  # gRPC's threads log too

    def filter(self, record: logging.LogRecord) -> bool:
        """True to write ``record``; False when it repeats a line inside its window."""
        if getattr(record, _SUMMARY, False):
            return True
        with self._lock:
            return self._admit(record)

    def _admit(self, record: logging.LogRecord) -> bool:
        now = record.created
        self._sweep(now)
        key = _key(record)
        seen = self._seen.get(key)
        if seen is not None and now - seen.first_s < self.window_s:
            seen.suppressed += 1
            seen.last_s = now
            seen.record = record
            return False
        if seen is not None:
            self._summarize(key)
        while len(self._seen) >= self.max_keys:
            self._summarize(next(iter(self._seen)))
        self._seen[key] = _Seen(first_s=now, last_s=now)
        return True

    def flush(self, now: float | None = None) -> None:
        """Write the counts of every window that ended by ``now`` (Unix seconds; default:
        every window, ended or not: for a process about to exit)."""
        with self._lock:
            if now is None:
                for key in list(self._seen):
                    self._summarize(key)
            else:
                self._sweep(now)

    def _sweep(self, now: float) -> None:
        # Kinds are kept in the order their windows opened, so the ended ones come first
        # and the sweep stops at the first open window (records from threads may arrive a
        # little out of order; such a window ends at a later sweep).
        ended = []
        for key, seen in self._seen.items():
            if now - seen.first_s < self.window_s:
                break
            ended.append(key)
        for key in ended:
            self._summarize(key)

    def _summarize(self, key: tuple[object, ...]) -> None:
        seen = self._seen.pop(key)
        if seen.suppressed and seen.record is not None and self.send is not None:
            line = logging.makeLogRecord(vars(seen.record))
            line.repeated = seen.suppressed
            line.window_s = round(seen.last_s - seen.first_s, 3)
            setattr(line, _SUMMARY, True)
            self.send(line)


def _key(record: logging.LogRecord) -> tuple[object, ...]:
    # the fields in the order the call site passed them: one call site, one order
    extras = tuple(
        (k, v if isinstance(v, _PLAIN) else repr(v))
        for k, v in vars(record).items()
        if k not in _STANDARD and k[:1] != "_"
    )
    return (record.name, record.levelno, record.getMessage(), extras)


_PLAIN = (str, int, float, bool, type(None))


def setup(
    service: str, *, level: str = "info", window_s: float = COLLAPSE_WINDOW_S
) -> logging.Handler:
    """Send every log record of this process to stderr as JSON lines tagged ``service``,
    at ``level`` (``parse_levels``), repeated lines collapsed over ``window_s`` seconds.
    Returns the handler (its ``Collapse`` filter is flushed when it is closed, as
    ``logging.shutdown`` does at exit).

    Raises ``ValueError`` for a ``level`` that ``parse_levels`` refuses.
    """
    root_level, loggers = parse_levels(level)
    handler = _CollapsingHandler(sys.stderr, window_s=window_s)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(root_level)
    for name, value in loggers.items():
        logging.getLogger(name).setLevel(value)
    quiet_tls_eof()
    return handler


_TLS_EOF = "returning true from eof_received() has no effect when using ssl"


def _not_tls_eof(record: logging.LogRecord) -> bool:
    return record.getMessage() != _TLS_EOF


def quiet_tls_eof() -> None:
    """Drop asyncio's warning that ``eof_received()`` returned true over TLS. nats-py
    connects in plain TCP and upgrades to TLS after the server's INFO (``loop.start_tls``),
    so asyncio's stream protocol believes it is not over TLS and asks to keep a half-closed
    connection open; asyncio then warns, once per closed connection, about nothing the
    program can act on. Idempotent."""
    log = logging.getLogger("asyncio")
    if _not_tls_eof not in log.filters:
        log.addFilter(_not_tls_eof)


class _CollapsingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    def __init__(self, stream: Any, *, window_s: float) -> None:
        super().__init__(stream)
        self.collapse = Collapse(window_s=window_s, send=self.handle)
        self.addFilter(self.collapse)

    def close(self) -> None:
        self.collapse.flush()
        super().close()
