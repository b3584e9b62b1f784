"""Bounded sizes, proven: every nats-server of vslice runs with ``max_payload`` of the
bounds, the largest value every bound admits fits well under it, and that value goes
through a real server -- written, compare-and-set, published and answered
(``libshared.payloads``)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from libshared import bounds, connecting, events, heartbeats, ledgers, payloads
from libshared import leases as leasing
from libshared.connecting import BusSettings
from libshared.devices import NodeDevices
from libshared.natsserver import NatsServer
from tests.bus.conftest import repo_root
from vslice import certs

BOUNDED: dict[str, Any] = {**payloads.KV_VALUES, **payloads.MESSAGES}
LARGE_TIMEOUT_S = 60.0  # megabytes over TLS on a loaded machine


def test_the_bounds_leave_a_quarter_of_max_payload_free() -> None:
    assert payloads.MAX_VALUE_BYTES == bounds.MAX_PAYLOAD_BYTES * 3 // 4


def test_every_nats_server_config_of_vslice_sets_max_payload_to_the_bounds_ceiling(
    tmp_path: Path,
) -> None:
    local = NatsServer(data_dir=tmp_path / "local")
    written = json.loads(local.write_config().read_text())
    assert written["max_payload"] == bounds.MAX_PAYLOAD_BYTES

    certs.provision(tmp_path / "compose", prefix="vslice", nodes=["n1"], hosts=["nats"])
    compose = json.loads((tmp_path / "compose" / "nats.conf").read_text())
    assert compose["max_payload"] == bounds.MAX_PAYLOAD_BYTES

    k8s = (repo_root() / "k8s" / "base" / "nats" / "nats.yaml").read_text()
    (megabytes,) = re.findall(r"^\s*max_payload:\s*(\d+)MB\s*$", k8s, re.MULTILINE)
    assert int(megabytes) << 20 == bounds.MAX_PAYLOAD_BYTES  # nats-server's MB is 2^20


async def test_a_client_learns_the_servers_max_payload_and_is_refused_one_byte_more(
    nc: Client, bus_settings: BusSettings
) -> None:
    assert nc.max_payload == bounds.MAX_PAYLOAD_BYTES
    with pytest.raises(nats.errors.MaxPayloadError):
        await nc.publish(f"{bus_settings.prefix}.big", b"x" * (bounds.MAX_PAYLOAD_BYTES + 1))
    await nc.flush()
    assert nc.is_connected  # refused before it was sent: the server had no reason to close


@pytest.mark.parametrize("where", sorted(BOUNDED))
def test_the_largest_value_the_bounds_admit_passes_the_door_and_fits_the_budget(
    where: str,
) -> None:
    tp = BOUNDED[where]
    raw = msgspec.json.encode(payloads.worst(tp))
    msgspec.json.decode(raw, type=tp)  # admissible: every bound of the door holds
    assert len(raw) == payloads.worst_bytes(tp)
    assert len(raw) <= payloads.MAX_VALUE_BYTES, f"{where}: {len(raw):,} bytes"


def _append_first(field: str) -> Callable[[dict[str, Any]], None]:
    def grow(value: dict[str, Any]) -> None:
        value[field].append(value[field][0])

    return grow


def _lengthen(*path: str | int) -> Callable[[dict[str, Any]], None]:
    def grow(value: dict[str, Any]) -> None:
        *inner, last = path
        target: Any = value
        for step in inner:
            target = target[step]
        target[last] += "a"

    return grow


def _one_more_key(field: str) -> Callable[[dict[str, Any]], None]:
    def grow(value: dict[str, Any]) -> None:
        first = next(iter(value[field]))
        value[field]["b" + first[1:]] = value[field][first]

    return grow


def _one_more_variable(value: dict[str, Any]) -> None:
    env = next(iter(value["env"].values()))
    env["Z" + next(iter(env))[1:]] = ""


@pytest.mark.parametrize(
    ("tp", "grow"),
    [
        pytest.param(ledgers.NodeLedger, _append_first("slices"), id="ledger-one-more-slice"),
        pytest.param(ledgers.NodeLedger, _append_first("charges"), id="ledger-one-more-charge"),
        pytest.param(ledgers.NodeLedger, _lengthen("slices", 0, "pod"), id="ledger-longer-pod"),
        pytest.param(ledgers.NodeLedger, _lengthen("node"), id="ledger-longer-node"),
        pytest.param(NodeDevices, _append_first("devices"), id="nodes-one-more-device"),
        pytest.param(NodeDevices, _lengthen("devices", 0, "uuid"), id="nodes-longer-uuid"),
        pytest.param(leasing.Lease, _lengthen("holder"), id="lease-longer-holder"),
        pytest.param(heartbeats.Heartbeat, _lengthen("host"), id="heartbeat-longer-host"),
        pytest.param(events.Failed, _lengthen("reason"), id="failed-longer-reason"),
        pytest.param(events.Ready, _one_more_key("env"), id="ready-one-more-container"),
        pytest.param(events.Ready, _one_more_variable, id="ready-one-more-variable"),
        pytest.param(events.NodeUsage, _append_first("containers"), id="usage-one-more-row"),
        pytest.param(events.NodeUsage, _append_first("escapes"), id="usage-one-more-escape"),
        pytest.param(events.NodeUsage, _append_first("problems"), id="usage-one-more-problem"),
        pytest.param(events.NodeUsage, _lengthen("problems", 0), id="usage-longer-problem"),
    ],
)
def test_the_largest_value_is_the_largest_one_more_entry_or_character_is_refused(
    tp: Any, grow: Callable[[dict[str, Any]], None]
) -> None:
    value = payloads.worst(tp)
    grow(value)
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(msgspec.json.encode(value), type=tp)


def test_the_largest_strings_are_written_in_the_widest_characters_their_pattern_allows() -> None:
    slice_ = payloads.worst(ledgers.NodeLedger)["slices"][0]
    assert len(slice_["pod"]) == bounds.MAX_NAME
    assert len(slice_["pod"].encode()) == 4 * bounds.MAX_NAME  # printable: 4-byte UTF-8
    assert payloads.worst(ledgers.NodeLedger)["node"] == "a" * bounds.MAX_NAME  # a subject token
    # a structured pattern no repeated character matches: the longest string it admits
    assert slice_["mig_profile"] == "99g.9999gb"


class _Loose(msgspec.Struct):
    pod_uid: bounds.Uid
    notes: dict[str, list[str]]


@pytest.mark.parametrize("where", ["a sample", *sorted(payloads.UNBOUNDED)])
def test_a_message_with_an_unbounded_field_is_named_with_that_fields_path(where: str) -> None:
    with pytest.raises(payloads.UnboundedError) as caught:
        payloads.worst(payloads.UNBOUNDED.get(where, _Loose))
    assert caught.value.path.startswith("$.") and caught.value.path in str(caught.value)


def test_no_message_is_left_unbounded_and_a_capped_ones_cap_fits_the_budget() -> None:
    assert payloads.UNBOUNDED == {}
    for where, (_, cap) in payloads.CAPPED.items():
        assert cap <= payloads.MAX_VALUE_BYTES, where


def test_an_unpatterned_string_is_written_in_control_characters_six_bytes_each() -> None:
    reason = payloads.worst(events.Failed)["reason"]
    assert len(reason) == bounds.MAX_TEXT
    assert len(msgspec.json.encode(reason)) == 6 * bounds.MAX_TEXT + 2


async def test_the_largest_kv_values_are_written_and_compare_and_set_through_a_real_server(
    nc: Client, bus_settings: BusSettings
) -> None:
    js = nc.jetstream(timeout=LARGE_TIMEOUT_S)
    bus = await connecting.ensure_bus(js, bus_settings)
    leases = await leasing.open_leases(js, bus_settings, create=True)
    buckets = {
        "vslice-nodes": bus.nodes,
        "vslice-ledger": bus.ledger,
        "vslice-pods": bus.pods,
        "vslice-leases": leases,
    }
    assert set(buckets) == set(payloads.KV_VALUES)
    for name, kv in buckets.items():
        tp = payloads.KV_VALUES[name]
        raw = msgspec.json.encode(payloads.worst(tp))
        key = "k" * 200  # the longest key a node name gives (nats.py caps keys)
        first = await kv.put(key, raw)
        # the write a replica commits with: compare-and-set, its revision in a header
        second = await kv.update(key, raw, last=first)
        entry = await kv.get(key)
        assert entry.revision == second and entry.value == raw, name
        msgspec.json.decode(entry.value, type=tp)
    assert nc.is_connected


async def test_the_largest_messages_are_answered_and_stored_through_a_real_server(
    nc: Client, bus_settings: BusSettings
) -> None:
    js = nc.jetstream(timeout=LARGE_TIMEOUT_S)
    await connecting.ensure_bus(js, bus_settings)
    subjects = bus_settings.subjects
    echo = f"{subjects.prefix}.echo"

    async def answer(msg: Msg) -> None:
        await msg.respond(msg.data)

    sub = await nc.subscribe(echo, cb=answer)
    try:
        for where, tp in payloads.MESSAGES.items():
            raw = msgspec.json.encode(payloads.worst(tp))
            reply = await nc.request(echo, raw, timeout=LARGE_TIMEOUT_S, headers={"x": where})
            assert reply.data == raw, where
        for where, (_, cap) in payloads.CAPPED.items():
            raw = b'{"pod": "' + b"x" * (cap - 11) + b'"}'
            assert len(raw) == cap
            reply = await nc.request(echo, raw, timeout=LARGE_TIMEOUT_S, headers={"x": where})
            assert reply.data == raw, where
    finally:
        await sub.unsubscribe()
    # the streams keep the largest of theirs: a placement, a heartbeat
    placement = msgspec.json.encode(
        payloads.worst(payloads.MESSAGES["vslice.alloc.<node>.decided"])
    )
    ack = await js.publish(subjects.alloc_decided("n1"), placement)
    assert (await js.get_msg(subjects.alloc_stream, ack.seq)).data == placement
    beat = msgspec.json.encode(payloads.worst(heartbeats.Heartbeat))
    assert len(beat) <= heartbeats.MAX_MSG_BYTES
    ack = await js.publish(subjects.health("operator", "i1"), beat)
    assert (await js.get_msg(subjects.health_stream, ack.seq)).data == beat
    assert nc.is_connected


def test_an_unschedulable_answer_about_a_fleet_of_any_size_keeps_within_its_bounds() -> None:
    fleet = {f"node-{i:05d}": "2/8 CardInsufficientMemory" + "!" * i for i in range(5000)}
    kept = events.node_reasons_of(fleet)
    assert list(kept) == list(fleet)[: events.MAX_NODE_REASONS]
    assert max(len(why) for why in kept.values()) == events.MAX_REASON
    answer = events.Unschedulable(pod_uid="p", reason="0/5000 nodes fit", node_reasons=kept)
    assert events.SCHEDULE_REPLY.decode(events.ENCODER.encode(answer)) == answer
    whole = events.Unschedulable(pod_uid="p", reason="0/5000 nodes fit", node_reasons=fleet)
    with pytest.raises(msgspec.ValidationError):
        events.SCHEDULE_REPLY.decode(events.ENCODER.encode(whole))
