"""The embedded nats-server: starts with JetStream on free ports, stops cleanly, clusters."""

from __future__ import annotations

from pathlib import Path

import pytest
from nats.js.errors import KeyWrongLastSequenceError

from libshared import connecting, waiting
from libshared.natsserver import NatsServer, find_binary, start_cluster


def test_a_nats_server_binary_is_found() -> None:
    assert find_binary().name == "nats-server"


async def test_a_started_server_accepts_jetstream_and_stops_cleanly(tmp_path: Path) -> None:
    server = NatsServer(data_dir=tmp_path)
    async with server:
        assert server.running and server.port > 0
        nc = await connecting.connect(server.bus_settings(), name="t")
        kv = await nc.jetstream().create_key_value(bucket="probe")
        first = await kv.update("k", b"1", last=0)
        with pytest.raises(KeyWrongLastSequenceError):
            await kv.update("k", b"2", last=0)
        assert await kv.update("k", b"3", last=first) > first
        await nc.close()
    assert not server.running
    assert (tmp_path / "jetstream").is_dir()


def test_two_servers_pick_different_ports(tmp_path: Path) -> None:
    with NatsServer(data_dir=tmp_path / "a") as a, NatsServer(data_dir=tmp_path / "b") as b:
        assert a.port != b.port and a.http_port != b.http_port


async def test_a_three_node_cluster_serves_a_replicated_bucket(tmp_path: Path) -> None:
    with start_cluster(tmp_path, size=3) as cluster:
        assert len(set(cluster.urls)) == 3
        nc = await connecting.connect(cluster.bus_settings(), name="t")
        js = nc.jetstream()
        kv = await js.create_key_value(bucket="r3", replicas=3)
        # the replicas elect a leader after the create returns; a put before that finds
        # no responders
        info = await waiting.bucket_ready(js, "r3")
        assert info.cluster is not None and info.cluster.leader
        await kv.put("k", b"v")
        status = await kv.status()
        assert status.stream_info.config.num_replicas == 3
        await nc.close()
