"""Waiting for a replicated stream to take writes: a leader, and every replica current."""

from __future__ import annotations

from pathlib import Path

import pytest
from nats.js.api import ClusterInfo, PeerInfo, StreamConfig, StreamInfo, StreamState

from libshared import connecting, waiting
from libshared.natsserver import NatsServer


def info(cluster: ClusterInfo | None) -> StreamInfo:
    return StreamInfo(
        config=StreamConfig(name="KV_b"),
        state=StreamState(messages=0, bytes=0, first_seq=0, last_seq=0, consumer_count=0),
        cluster=cluster,
    )


@pytest.mark.parametrize(
    ("cluster", "lacks"),
    [
        (None, ""),
        (ClusterInfo(name="c"), "no leader elected yet"),
        (ClusterInfo(name="c", leader="n1", replicas=[PeerInfo(name="n2", current=True)]), ""),
        (
            ClusterInfo(
                name="c",
                leader="n1",
                replicas=[PeerInfo(name="n2", current=True), PeerInfo(name="n3", current=False)],
            ),
            "leader n1; replicas not current: n3",
        ),
        (
            ClusterInfo(
                name="c", leader="n1", replicas=[PeerInfo(name="n2", current=True, offline=True)]
            ),
            "leader n1; replicas not current: n2",
        ),
    ],
)
def test_a_stream_is_ready_with_a_leader_and_current_replicas(
    cluster: ClusterInfo | None, lacks: str
) -> None:
    assert waiting.readiness(info(cluster)) == lacks


async def test_a_bucket_on_one_server_is_ready_at_once_and_a_missing_one_times_out(
    tmp_path: Path,
) -> None:
    async with NatsServer(data_dir=tmp_path) as server:
        nc = await connecting.connect(server.bus_settings(), name="t")
        try:
            js = nc.jetstream()
            await js.create_key_value(bucket="one")
            ready = await waiting.bucket_ready(js, "one", timeout_s=10)
            assert ready.config.name == "KV_one"
            with pytest.raises(waiting.NotReadyError, match="stream KV_none: not ready after 0 s"):
                await waiting.bucket_ready(js, "none", timeout_s=0.3)
        finally:
            await nc.close()
