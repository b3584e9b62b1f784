"""The largest value every bounded KV value and message can have, built from its bounds.

A value over nats-server's ``max_payload`` is not refused politely: the server closes the
connection that sent it (a replica committing a ledger grown by a 600 KB pod name went
deaf that way). So the bounds of ``libshared.bounds`` must keep every value well under
``bounds.MAX_PAYLOAD_BYTES``, and this module proves it: ``worst`` builds, from a type's
msgspec constraints alone, the admissible value whose JSON is the longest -- every string
at its ``max_length`` in the widest characters its pattern allows (4-byte UTF-8), every
collection at its ``max_length``, every number at its longest decimal form -- and
``worst_bytes`` encodes it. The tests decode that value with the type's own decoder (so
it is admissible) and commit it through a real server.

``KV_VALUES`` and ``MESSAGES`` list what travels, by bucket and by subject; ``MAX_VALUE_BYTES``
is the budget each must fit (three quarters of ``max_payload``); ``CAPPED`` lists the
messages with a free-form field (a pod object) that their door bounds by bytes instead,
refusing a body over the cap before decoding it; ``UNBOUNDED`` names the messages with a
field no bound limits yet (their size would follow the fleet, not the bounds; none
today). ``worst`` raises ``UnboundedError`` naming the field for those. Pure.
"""

from __future__ import annotations

import math
import re
from typing import Any

import msgspec
from msgspec import inspect

from libshared import bounds, events, heartbeats, leases, ledgers, resources
from libshared.devices import NodeDevices
from libshared.errors import VsliceError

# JSON grows a character the most as a control character (6 bytes as ``\\u00XX``, where
# the pattern allows one), then as a 4-byte UTF-8 sequence; then an escaped quote (2
# bytes), then ASCII.
_WIDEST = ("\x01", "\U0001d519", '"', "a", "0")
# The longest shortest-repr of a double, as msgspec writes it.
_LONGEST_FLOAT = -2.2250738585072014e-308
_INT64_MIN = -(1 << 63)

# The most any bounded value may take: a quarter of max_payload stays free for headers
# (a compare-and-set's expected revision, a request's deadline) and for bounds to grow.
MAX_VALUE_BYTES = bounds.MAX_PAYLOAD_BYTES * 3 // 4

# What each KV bucket holds (by its name under the default prefix).
KV_VALUES: dict[str, Any] = {
    "vslice-nodes": NodeDevices,
    "vslice-ledger": ledgers.NodeLedger,
    "vslice-pods": bounds.NodeName,  # the claimed node, UTF-8 (JSON's quotes: an upper bound)
    "vslice-leases": leases.Lease,
}
# What each subject carries whose every field is bounded.
MESSAGES: dict[str, Any] = {
    "vslice.sched.schedule": resources.PodRequest,
    "vslice.sched.schedule (reply)": events.Placement,
    "vslice.sched.schedule (unschedulable)": events.Unschedulable,
    "vslice.sched.release": events.Release,
    "vslice.sched.release (reply)": events.Ack,
    "vslice.alloc.<node>.decided": events.Placement,
    "vslice.node.<node>.slice": events.SliceQuery,
    "vslice.health.<identity>.<instance>": heartbeats.Heartbeat,
    "vslice.sched.stats (reply)": events.Stats,
    "vslice.alloc.<node>.ready": events.Ready,
    "vslice.alloc.<node>.failed": events.Failed,
    "vslice.usage.<node>": events.NodeUsage,
}
# What each subject carries whose fields are free-form, and the byte cap its door refuses
# anything over before decoding: an admission review holds a whole pod object.
CAPPED: dict[str, tuple[Any, int]] = {
    "vslice.admission.review": (events.AdmissionReview, events.MAX_REVIEW_BYTES),
}
# Messages with a field no bound limits yet, and the field (none today).
UNBOUNDED: dict[str, Any] = {}


class UnboundedError(VsliceError):
    """A type has a field no bound limits: ``path`` names it (``$.slices[].pod``)."""

    def __init__(self, path: str, what: str) -> None:
        self.path = path
        super().__init__(f"{path}: {what} has no bound")


def worst(tp: Any) -> Any:
    """The admissible value of type ``tp`` (a msgspec Struct, or an annotated type) whose
    JSON encoding is the longest, as builtins (dicts, lists, str, int, float) ready for
    ``msgspec.json.encode``. Raises ``UnboundedError`` for a string, collection or
    ``Any`` without a bound. Pure."""
    return _worst(inspect.type_info(tp), "$", 0)


def worst_bytes(tp: Any) -> int:
    """The length in bytes of the JSON of ``worst(tp)``: the largest value of ``tp`` the
    bounds admit. Raises ``UnboundedError`` as ``worst`` does. Pure."""
    return len(msgspec.json.encode(worst(tp)))


def _encoded(value: Any) -> int:
    return len(msgspec.json.encode(value))


def _string(t: inspect.StrType, path: str, variant: int) -> str:
    if t.max_length is None:
        raise UnboundedError(path, "string")
    n = t.max_length
    best: str | None = None
    for ch in _WIDEST:
        s = ch * n
        if variant and n:
            # distinct values (dict keys): the tail varies, keeping its width
            tail = chr(ord(ch) + variant) if len(ch.encode()) == 4 else str(variant)
            s = ch * (n - len(tail)) + tail
        if t.pattern is not None and not re.search(t.pattern, s):
            continue
        if best is None or _encoded(s) > _encoded(best):
            best = s
    if best is None and t.pattern is not None:
        # a structured pattern: the longest string bounds names for it
        example = bounds.WIDEST_BY_PATTERN.get(t.pattern)
        if example is not None and len(example) <= n and re.search(t.pattern, example):
            best = example
    if best is None:
        raise UnboundedError(path, f"pattern {t.pattern!r} (no widest string found)")
    return best


def _int(t: inspect.IntType) -> int:
    low = t.ge if t.ge is not None else (t.gt + 1 if t.gt is not None else _INT64_MIN)
    high = t.le if t.le is not None else (t.lt - 1 if t.lt is not None else (1 << 64) - 1)
    return max((low, high), key=lambda v: len(str(v)))


def _float(t: inspect.FloatType) -> float:
    low = t.ge if t.ge is not None else (t.gt if t.gt is not None else -math.inf)
    high = t.le if t.le is not None else (t.lt if t.lt is not None else math.inf)
    candidates = [
        _LONGEST_FLOAT,
        -_LONGEST_FLOAT,
        math.nextafter(high, low) if math.isfinite(high) else -1.7976931348623157e308,
        math.nextafter(low, high) if math.isfinite(low) else 1.7976931348623157e308,
    ]
    fits = [c for c in candidates if low <= c <= high and math.isfinite(c)]
    return max(fits, key=lambda v: len(msgspec.json.encode(v)))


def _worst(t: inspect.Type, path: str, variant: int) -> Any:
    if isinstance(t, inspect.StructType):
        out: dict[str, Any] = {}
        if t.tag_field is not None:
            out[t.tag_field] = t.tag
        for f in t.fields:
            out[f.encode_name] = _worst(f.type, f"{path}.{f.name}", 0)
        return out
    if isinstance(t, inspect.StrType):
        return _string(t, path, variant)
    if isinstance(t, inspect.BoolType):
        return False
    if isinstance(t, inspect.NoneType):
        return None
    if isinstance(t, inspect.IntType):
        return _int(t)
    if isinstance(t, inspect.FloatType):
        return _float(t)
    if isinstance(t, inspect.LiteralType):
        return max(t.values, key=_encoded)
    if isinstance(t, inspect.UnionType):
        return max((_worst(u, path, variant) for u in t.types), key=_encoded)
    if isinstance(t, (inspect.ListType, inspect.VarTupleType)):
        if t.max_length is None:
            raise UnboundedError(path, "collection")
        return [_worst(t.item_type, f"{path}[]", 0) for _ in range(t.max_length)]
    if isinstance(t, inspect.TupleType):
        return [_worst(item, f"{path}[{i}]", 0) for i, item in enumerate(t.item_types)]
    if isinstance(t, inspect.DictType):
        if t.max_length is None:
            raise UnboundedError(path, "mapping")
        keys = [_worst(t.key_type, f"{path}{{}}", i + 1) for i in range(t.max_length)]
        return {k: _worst(t.value_type, f"{path}{{}}", 0) for k in keys}
    raise UnboundedError(path, type(t).__name__.removesuffix("Type"))
