"""Messages between services about placements (msgspec Structs, frozen, keyword-only).

``Placement`` is what a scheduler commits to the ledger and sends to the node agent;
``Unschedulable`` carries the reason and, per rejected node, HAMi-style counted reasons
(``{"node-7": "2/8 CardInsufficientMemory"}``).
"""

from __future__ import annotations

import msgspec

from libshared.ledgers import PodCharge, Slice


class Placement(msgspec.Struct, frozen=True, kw_only=True, tag="placement"):
    """A pod's slices on one node, plus its node-level CPU/memory charge."""

    pod_uid: str
    namespace: str
    pod: str
    node: str
    slices: tuple[Slice, ...]
    charge: PodCharge


class Unschedulable(msgspec.Struct, frozen=True, kw_only=True, tag="unschedulable"):
    """No node fits: ``reason`` for people, ``node_reasons`` per rejected node."""

    pod_uid: str
    reason: str
    node_reasons: dict[str, str] = {}


Decision = Placement | Unschedulable
