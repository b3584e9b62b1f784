"""Errors that cross vslice's boundaries, each carrying the data a caller needs.

A bad request names the container, the field and the value; a bad annotation names the key
and the value. Callers turn these into denials, HTTP 400s or logged rejections; nothing
here logs or retries.
"""

from __future__ import annotations


class VsliceError(Exception):
    """Base of every error vslice raises on purpose."""


# how long a client waits before sending a request answered temporary again (seconds)
RETRY_AFTER_S = 0.25


class TemporaryError(VsliceError):
    """The bus could not be read or written well enough to answer; the same request may
    be sent again after ``retry_after_s`` seconds (kopf's ``TemporaryError(delay=...)``
    has the same shape). On the wire it is a ``libshared.events.BusError`` with
    ``retry_after_s`` set; clients read that field, never the reason's text."""

    def __init__(self, message: str, *, retry_after_s: float = RETRY_AFTER_S) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message)


class InvalidRequest(VsliceError):
    """A pod's GPU request is malformed or impossible.

    Attributes: ``container`` (container name, or ``""`` for pod-level fields),
    ``field`` (the resource or annotation name), ``value`` (as given), ``reason``.
    """

    def __init__(self, *, container: str, field: str, value: object, reason: str) -> None:
        self.container = container
        self.field = field
        self.value = value
        self.reason = reason
        where = f"container {container!r}: " if container else ""
        super().__init__(f"{where}{field}={value!r}: {reason}")


class AnnotationDecodeError(VsliceError):
    """An annotation value cannot be decoded; its capacity must stay accounted for.

    HAMi silently skipped such values and offered the capacity again (HAMi #2958);
    vslice raises instead. Attributes: ``key``, ``value``, ``reason``.
    """

    def __init__(self, *, key: str, value: str, reason: str) -> None:
        self.key = key
        self.value = value
        self.reason = reason
        shown = value if len(value) <= 200 else value[:200] + "..."
        super().__init__(f"annotation {key}={shown!r}: {reason}")


class TraceFormatError(VsliceError):
    """A trace or fleet CSV row is malformed: names the file, the line and the field."""

    def __init__(self, *, path: str, line: int, field: str, value: object, reason: str) -> None:
        self.path = path
        self.line = line
        self.field = field
        self.value = value
        super().__init__(f"{path}:{line}: {field}={value!r}: {reason}")
