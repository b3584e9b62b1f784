"""The scheduler on the bus: schedule, release, idempotent re-sends, bad input, no fit."""

from __future__ import annotations

import dataclasses

import pytest
from nats.aio.client import Client

from libshared import events
from libshared.connecting import BusSettings
from services.scheduler.settings import Settings
from tests.bus import helpers


def replica_settings(bus: BusSettings, name: str = "r1") -> Settings:
    return Settings(bus=bus, name=name)


async def test_a_scheduled_pod_is_in_the_ledger_and_release_frees_exactly_its_slices(
    nc: Client, bus_settings: BusSettings
) -> None:
    await helpers.register(nc, bus_settings, helpers.fleet(nodes=1, gpus=2))
    async with helpers.replica(replica_settings(bus_settings)):
        a = await helpers.schedule(nc, bus_settings, helpers.pod("a", memory_mib=4000, cores=30))
        b = await helpers.schedule(nc, bus_settings, helpers.pod("b", memory_mib=2000, cores=20))
        assert isinstance(a, events.Placement) and isinstance(b, events.Placement)
        assert a.node == "node-0" and a.slices[0].memory_mib == 4000
        ledger = (await helpers.ledgers(nc, bus_settings))["node-0"]
        assert ledger.pods() == {"a", "b"}

        ack = await helpers.release(nc, bus_settings, "a")
        assert ack == events.Ack(pod_uid="a", node="node-0", slices=1)
        ledger = (await helpers.ledgers(nc, bus_settings))["node-0"]
        assert ledger.pods() == {"b"} and ledger.slices == b.slices

        again = await helpers.release(nc, bus_settings, "a")
        assert again == events.Ack(pod_uid="a", node=None, slices=0)


async def test_re_sending_a_schedule_request_returns_the_existing_placement(
    nc: Client, bus_settings: BusSettings
) -> None:
    await helpers.register(nc, bus_settings, helpers.fleet(nodes=3, gpus=2))
    one = replica_settings(bus_settings, "r1")
    two = replica_settings(bus_settings, "r2")
    async with helpers.replica(one), helpers.replica(two):
        first = await helpers.schedule(nc, bus_settings, helpers.pod("p", memory_mib=1000))
        assert isinstance(first, events.Placement)
        # queue-group delivery spreads the re-sends over both replicas
        for _ in range(10):
            again = await helpers.schedule(nc, bus_settings, helpers.pod("p", memory_mib=1000))
            assert again == first
        ledgers = await helpers.ledgers(nc, bus_settings)
        holders = [n for n, led in ledgers.items() if "p" in led.pods()]
        assert holders == [first.node]
        assert len(ledgers[first.node].slices) == 1


async def test_a_pod_that_fits_nowhere_is_unschedulable_with_hami_reasons(
    nc: Client, bus_settings: BusSettings
) -> None:
    await helpers.register(nc, bus_settings, helpers.fleet(nodes=1, gpus=1, memory_mib=8000))
    async with helpers.replica(replica_settings(bus_settings)):
        reply = await helpers.schedule(nc, bus_settings, helpers.pod("big", memory_mib=9000))
        assert isinstance(reply, events.Unschedulable)
        assert reply.pod_uid == "big"
        assert "CardInsufficientMemory" in reply.node_reasons["node-0"]
        assert await helpers.ledgers(nc, bus_settings) == {}


async def test_a_malformed_message_gets_an_error_naming_it_and_the_replica_keeps_serving(
    nc: Client, bus_settings: BusSettings
) -> None:
    await helpers.register(nc, bus_settings, helpers.fleet(nodes=1))
    subjects = bus_settings.subjects
    async with helpers.replica(replica_settings(bus_settings)):
        for subject, body, named in (
            (subjects.sched_schedule, b"{not json", "malformed PodRequest"),
            (subjects.sched_schedule, b'{"uid": 7}', "$.uid"),
            (subjects.sched_schedule, b'{"uid": ""}', "$.uid=''"),
            (subjects.sched_release, b'{"type": "release"}', "pod_uid"),
            (subjects.sched_release, b"\xff\xfe", "malformed Release"),
        ):
            msg = await nc.request(subject, body, timeout=5)
            reply = events.SCHEDULE_REPLY.decode(msg.data)
            assert isinstance(reply, events.BusError)
            assert named in reply.reason
        ok = await helpers.schedule(nc, bus_settings, helpers.pod("fine", memory_mib=100))
        assert isinstance(ok, events.Placement)


def test_settings_come_from_flags_and_environment() -> None:
    from services.scheduler import settings

    s = settings.parse(
        ["--policy", "hami-spread", "--max-attempts", "3"],
        {"VSLICE_NATS_URL": "nats://a:1,nats://b:2", "VSLICE_PREFIX": "pfx"},
    )
    assert s.bus.urls == ("nats://a:1", "nats://b:2") and s.bus.prefix == "pfx"
    assert s.policy == "hami-spread" and s.max_attempts == 3
    assert s.max_in_flight == 32 and settings.parse(["--max-in-flight", "4"], {}).max_in_flight == 4
    with pytest.raises(SystemExit):
        settings.parse(["--max-in-flight", "0"], {})
    assert dataclasses.replace(s, seed=5).seed == 5


def test_seed_is_an_integer_or_auto_from_the_replica_name(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from services.scheduler import settings

    assert settings.parse(["--seed", "7"], {}).seed == 7
    assert settings.parse([], {"VSLICE_SEED": "11"}).seed == 11
    a = settings.parse(["--seed", "auto", "--name", "sched-a"], {})
    b = settings.parse([], {"VSLICE_SEED": "auto", "VSLICE_NATS_URL": "nats://x:1"})
    again = settings.parse(["--seed", "AUTO", "--name", "sched-a"], {})
    other = settings.parse(["--seed", "auto", "--name", "sched-b"], {})
    assert a.seed == again.seed != other.seed  # stable per name, apart between names
    assert isinstance(b.seed, int)
    with pytest.raises(SystemExit):
        settings.parse(["--seed", "seven"], {})
    assert "--seed 'seven'" in capsys.readouterr().err


def test_the_replica_index_and_count_come_from_flags_environment_or_the_name(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from services.scheduler import app, settings

    alone = settings.parse([], {})
    assert (alone.replica_index, alone.replicas) == (0, 1)
    flags = ["--replica-index", "2", "--replica-count", "3", "--shard-epsilon", "0.2"]
    s = settings.parse(flags, {})
    assert (s.replica_index, s.replicas, s.shard_epsilon) == (2, 3, 0.2)
    built = app.build_scheduler(s).partition
    assert (built.index, built.count, built.epsilon) == (2, 3, 0.2)
    env = settings.parse([], {"VSLICE_REPLICA_INDEX": "1", "VSLICE_REPLICA_COUNT": "2"})
    assert (env.replica_index, env.replicas) == (1, 2)
    named = [
        settings.parse(["--replica-index", "auto", "--replica-count", "4", "--name", f"r{i}"], {})
        for i in range(8)
    ]
    assert {n.replica_index for n in named} <= {0, 1, 2, 3}
    assert len({n.replica_index for n in named}) > 1  # drawn from the name, not fixed


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--replica-index", "2", "--replica-count", "2"], "--replica-index 2"),
        (["--replica-count", "0"], "--replica-count 0"),
        (["--replica-count", "two"], "--replica-count 'two'"),
        (["--replica-index", "first"], "--replica-index 'first'"),
        (["--shard-epsilon", "2"], "--shard-epsilon 2.0"),
    ],
)
def test_a_bad_replica_flag_exits_naming_the_flag_and_value(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from services.scheduler import settings

    with pytest.raises(SystemExit):
        settings.parse(argv, {})
    assert named in capsys.readouterr().err


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (
            b'{"uid":"p","containers":[{"name":"c","index":0,"init":false,"gpu_count":1,'
            b'"memory_percent":-100}]}',
            "containers[0].memory_percent=-100",
        ),
        (
            b'{"uid":"p","containers":[{"name":"c","index":0,"init":false,"gpu_count":1,'
            b'"memory_mib":1000,"cores_percent":-100}]}',
            "containers[0].cores_percent=-100",
        ),
        (
            b'{"uid":"p","containers":[{"name":"c","index":0,"init":false,"gpu_count":-1}]}',
            "containers[0].gpu_count=-1",
        ),
        (b'{"uid":"' + b"x" * 600 + b'"}', "uid="),
        (b'{"uid":"p","name":"' + b"n" * 600_000 + b'"}', "name="),
    ],
)
async def test_a_request_out_of_bounds_is_refused_naming_its_field_and_value(
    nc: Client, bus_settings: BusSettings, body: bytes, named: str
) -> None:
    await helpers.register(nc, bus_settings, helpers.fleet(nodes=1))
    async with helpers.replica(replica_settings(bus_settings)):
        reply = await nc.request(bus_settings.subjects.sched_schedule, body, timeout=10)
        answer = events.SCHEDULE_REPLY.decode(reply.data)
        assert isinstance(answer, events.BusError)
        assert named in answer.reason, answer.reason
        held = await helpers.ledgers(nc, bus_settings)
        assert all(not ledger.slices for ledger in held.values())
