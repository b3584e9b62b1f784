"""Admission on the bus: pods in, normalized requests or denials naming field and value out."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from nats.aio.client import Client

from libshared import events
from libshared.connecting import BusSettings
from libshared.resources import PodRequest
from services.admission import app
from services.admission.settings import Settings
from tests.bus import helpers


@contextlib.asynccontextmanager
async def admission(bus: BusSettings) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(app.main(Settings(bus=bus), stop=stop))
    try:
        await helpers.wait_for_subscribers(bus, bus.subjects.admission_review)
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def pod_spec(limits: dict[str, Any], *, uid: str = "u1") -> dict[str, Any]:
    return {
        "metadata": {"name": "train", "namespace": "ml", "uid": uid},
        "spec": {"containers": [{"name": "main", "resources": {"limits": limits}}]},
    }


async def review(
    nc: Client, bus: BusSettings, body: bytes
) -> PodRequest | events.Denial | events.BusError:
    msg = await nc.request(bus.subjects.admission_review, body, timeout=5)
    return events.decode_review_reply(msg.data)


async def test_a_pod_spec_comes_back_as_a_normalized_request(
    nc: Client, bus_settings: BusSettings
) -> None:
    spec = pod_spec({"nvidia.com/gpu": 1, "nvidia.com/gpumem": "4000", "nvidia.com/gpucores": 30})
    async with admission(bus_settings):
        for body in (
            events.ENCODER.encode(events.AdmissionReview(pod=spec)),
            events.ENCODER.encode(spec),
        ):
            reply = await review(nc, bus_settings, body)
            assert isinstance(reply, PodRequest)
            assert (reply.uid, reply.namespace, reply.name) == ("u1", "ml", "train")
            (c,) = reply.containers
            assert (c.gpu_count, c.memory_mib, c.cores_percent) == (1, 4000, 30)


@pytest.mark.parametrize(
    ("limits", "field", "value"),
    [
        # gpucores over 100 and gpumem-percentage 0 are HAMi's to accept (clamped / unset);
        # a percentage over 100 is what HAMi's webhook denies
        ({"nvidia.com/gpu": 1, "nvidia.com/gpucores": -5}, "nvidia.com/gpucores", "-5"),
        (
            {"nvidia.com/gpu": 1, "nvidia.com/gpumem-percentage": 150},
            "nvidia.com/gpumem-percentage",
            "150",
        ),
        ({"nvidia.com/gpu": "two"}, "nvidia.com/gpu", "two"),
    ],
)
async def test_a_bad_request_is_denied_naming_the_field_and_value(
    nc: Client, bus_settings: BusSettings, limits: dict[str, Any], field: str, value: str
) -> None:
    async with admission(bus_settings):
        reply = await review(nc, bus_settings, events.ENCODER.encode(pod_spec(limits)))
        assert isinstance(reply, events.Denial)
        assert (reply.uid, reply.container, reply.field, reply.value) == (
            "u1",
            "main",
            field,
            value,
        )


async def test_a_malformed_review_is_answered_with_an_error_and_admission_keeps_serving(
    nc: Client, bus_settings: BusSettings
) -> None:
    async with admission(bus_settings):
        for body in (b"[1, 2]", b"{", b'{"type": "admission-review", "pod": 3}'):
            reply = await review(nc, bus_settings, body)
            assert isinstance(reply, events.BusError) and reply.reason
        ok = await review(nc, bus_settings, events.ENCODER.encode(pod_spec({"nvidia.com/gpu": 2})))
        assert isinstance(ok, PodRequest) and ok.containers[0].gpu_count == 2
