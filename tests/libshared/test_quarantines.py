"""Reading a registration or ledger value either gives the node's value or raises
``Unreadable`` naming the node, the reason and the field: never another error, whatever
the bytes."""

from __future__ import annotations

import random
from typing import Any

import msgspec
import pytest

from libshared import events, quarantines
from libshared.devices import Device, NodeDevices
from libshared.ledgers import NodeLedger, Slice

REGISTRATION = events.ENCODER.encode(
    NodeDevices(node="n1", devices=(Device(uuid="GPU-0", index=0, type="A100", memory_mib=16000),))
)
LEDGER = events.ENCODER.encode(
    NodeLedger(
        node="n1",
        slices=(
            Slice(
                pod_uid="p", namespace="ns", pod="p", container="main", container_index=0,
                uuid="GPU-0", device_index=0, memory_mib=1000, cores_percent=10,
            ),
        ),
    )
)  # fmt: skip
READERS = {"registration": quarantines.read_registration, "ledger": quarantines.read_ledger}
REASONS = {
    "registration": quarantines.REGISTRATION_UNREADABLE,
    "ledger": quarantines.LEDGER_UNREADABLE,
}


def any_json(rng: random.Random, depth: int = 0) -> Any:
    """A random JSON value: scalars of every type (out-of-range numbers, odd strings
    included), lists and objects nested up to three deep."""
    pick = rng.randrange(8 if depth < 3 else 6)
    if pick == 0:
        return None
    if pick == 1:
        return rng.random() < 0.5
    if pick == 2:
        return rng.choice([-1, 0, 1, 101, 1 << 40, -(1 << 63), rng.randrange(-1000, 1000)])
    if pick == 3:
        return rng.choice([0.5, -1e300, 1e300, rng.uniform(-100, 200)])
    if pick == 4:
        # surrogates (0xD800-0xDFFF) cannot be encoded: skip them
        top = 0xD7FF if rng.random() < 0.2 else 127
        return "".join(chr(rng.randrange(top)) for _ in range(rng.randrange(12)))
    if pick == 5:
        return rng.choice(["", "n1", "x" * 300, "GPU-0", "\x00"])
    if pick == 6:
        return [any_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {
        rng.choice(["node", "uuid", "a", ""]): any_json(rng, depth + 1)
        for _ in range(rng.randrange(4))
    }


def mutated(raw: bytes, path: list[str | int], value: Any) -> bytes:
    doc = msgspec.json.decode(raw)
    at = doc
    for step in path[:-1]:
        at = at[step]
    at[path[-1]] = value
    return msgspec.json.encode(doc)


@pytest.mark.parametrize("kind", READERS)
def test_any_bytes_read_as_the_nodes_value_or_unreadable(kind: str) -> None:
    rng = random.Random(7)
    good = REGISTRATION if kind == "registration" else LEDGER
    samples = [rng.randbytes(rng.randrange(200)) for _ in range(300)]
    samples += [good[: rng.randrange(len(good))] for _ in range(100)]  # cut short
    samples += [good.replace(b'"', b"'", 1), good + b"}", b"", b"null", b"[]", b"{}"]
    for raw in samples:
        try:
            value = READERS[kind]("n1", raw)
        except quarantines.Unreadable as bad:
            assert bad.node == "n1" and bad.reason == REASONS[kind] and bad.detail
        else:
            assert value.node == "n1"


@pytest.mark.parametrize(
    ("kind", "path"),
    [
        ("registration", ["devices", 0, "memory_mib"]),
        ("registration", ["devices", 0, "uuid"]),
        ("registration", ["node"]),
        ("ledger", ["slices", 0, "cores_percent"]),
        ("ledger", ["slices", 0, "pod_uid"]),
        ("ledger", ["node"]),
    ],
)
def test_any_json_in_one_field_reads_as_the_nodes_value_or_unreadable(
    kind: str, path: list[str | int]
) -> None:
    rng = random.Random(11)
    unreadable = 0
    for _ in range(300):
        raw = mutated(REGISTRATION if kind == "registration" else LEDGER, path, any_json(rng))
        try:
            READERS[kind]("n1", raw)
        except quarantines.Unreadable as bad:
            unreadable += 1
            assert bad.reason == REASONS[kind] and len(bad.detail) <= quarantines.MAX_SHOWN
    assert unreadable > 0


@pytest.mark.parametrize(
    ("kind", "path", "value", "named"),
    [
        ("registration", ["devices", 0, "memory_mib"], -1, "$.devices[0].memory_mib=-1"),
        ("ledger", ["slices", 0, "cores_percent"], 101, "$.slices[0].cores_percent=101"),
        ("ledger", ["node"], "n2", "value names node 'n2', its key is 'n1'"),
        ("registration", ["node"], "n2", "value names node 'n2', its key is 'n1'"),
    ],
)
def test_an_unreadable_value_names_the_field_and_the_value(
    kind: str, path: list[str | int], value: Any, named: str
) -> None:
    raw = mutated(REGISTRATION if kind == "registration" else LEDGER, path, value)
    with pytest.raises(quarantines.Unreadable) as bad:
        READERS[kind]("n1", raw)
    assert named in bad.value.detail and bad.value.reason == REASONS[kind]


def test_a_good_value_reads_back_and_a_deleted_key_is_named_with_its_repair() -> None:
    assert quarantines.read_registration("n1", REGISTRATION).devices[0].uuid == "GPU-0"
    assert quarantines.read_ledger("n1", LEDGER).pods() == {"p"}
    gone = quarantines.deleted("n1", 42)
    assert gone.reason == quarantines.LEDGER_DELETED
    assert "revision 42" in gone.detail and "vslice repair n1" in gone.detail
