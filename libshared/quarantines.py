"""Reading one node's bucket values without letting a bad one cost more than that node.

A value of ``<prefix>-nodes`` or ``<prefix>-ledger`` that does not decode, fails the
bounds of ``libshared.bounds``, or names another node than its key, quarantines its node
(``ARCHITECTURE.md``, "A bad entry costs one node, not the fleet"): the scheduler offers
it no new pod, the metrics exporter and ``vslice status`` show it, and a later good value
lifts the quarantine. A deleted ledger key quarantines its node too: the slices it held
are unknown until ``vslice repair NODE`` rebuilds its ledger (an empty ledger would offer
memory its pods still use).

Every reader of those buckets (scheduler replicas, node agents, metrics, the CLI) reads
through ``read_registration`` and ``read_ledger`` here, so they agree on what is bad and
name it the same way. The reason codes are vslice's own, not HAMi's: HAMi keeps
registrations in node annotations and has no ledger.

Pure: no I/O.
"""

from __future__ import annotations

from typing import TypeVar

import msgspec

from libshared import bounds, events
from libshared.devices import NodeDevices
from libshared.errors import VsliceError
from libshared.ledgers import NodeLedger

LEDGER_UNREADABLE = "NodeLedgerUnreadable"
LEDGER_DELETED = "NodeLedgerDeleted"
REGISTRATION_UNREADABLE = "NodeRegistrationUnreadable"
REASONS = (REGISTRATION_UNREADABLE, LEDGER_UNREADABLE, LEDGER_DELETED)

MAX_SHOWN = 200  # characters of a value's text kept in a detail
_T = TypeVar("_T", NodeDevices, NodeLedger)


class Unreadable(VsliceError, ValueError):
    """A bucket value that cannot be taken in: ``node`` (its key), ``reason`` (one of
    ``REASONS``) and ``detail`` (the field and value at fault, or the decoder's words)."""

    def __init__(self, node: str, reason: str, detail: str) -> None:
        self.node = node
        self.reason = reason
        self.detail = detail[:MAX_SHOWN]
        super().__init__(f"node {node!r}: {reason}: {self.detail}")


def _read(decoder: msgspec.json.Decoder[_T], key: str, raw: bytes, reason: str) -> _T:
    try:
        value = decoder.decode(raw)
    except bounds.DECODE_ERRORS as exc:  # ValidationError is a DecodeError
        raise Unreadable(key, reason, bounds.describe(exc, raw)) from exc
    if value.node != key:
        raise Unreadable(key, reason, f"value names node {value.node!r}, its key is {key!r}")
    return value


def read_registration(key: str, raw: bytes) -> NodeDevices:
    """The ``NodeDevices`` stored under ``key`` in ``<prefix>-nodes``.

    Raises ``Unreadable`` (``REGISTRATION_UNREADABLE``) when ``raw`` is not JSON, fails the
    schema's bounds, or names another node than ``key``."""
    return _read(events.NODE_DEVICES, key, raw, REGISTRATION_UNREADABLE)


def read_ledger(key: str, raw: bytes) -> NodeLedger:
    """The ``NodeLedger`` stored under ``key`` in ``<prefix>-ledger``.

    Raises ``Unreadable`` (``LEDGER_UNREADABLE``) when ``raw`` is not JSON, fails the
    schema's bounds, or names another node than ``key``."""
    return _read(events.NODE_LEDGER, key, raw, LEDGER_UNREADABLE)


def deleted(key: str, revision: int) -> Unreadable:
    """The quarantine of a node whose ledger key was deleted (or purged) at ``revision``."""
    return Unreadable(
        key,
        LEDGER_DELETED,
        f"ledger key deleted at revision {revision}; `vslice repair {key}` rebuilds it",
    )


def deletion_of(exc: Exception) -> int | None:
    """The revision of the delete (or purge) marker a KV ``get``'s ``KeyNotFoundError``
    carries: nats-py raises it with the marker as its ``entry`` for a deleted key. None for
    a key never written, or whose marker was purged since."""
    entry = getattr(exc, "entry", None)
    if entry is None:
        return None
    revision = getattr(entry, "revision", None)
    return revision if isinstance(revision, int) else 0
