"""The doors of the last free-form messages, on a real server: the admission service
refuses a review over ``events.MAX_REVIEW_BYTES`` before decoding it and still answers the
next one; ``vslice run`` refuses a node agent's answer over a bound of ``Ready``, naming
the field, and takes the next good one."""

from __future__ import annotations

import logging

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from libshared import bounds, events, payloads
from libshared.connecting import BusSettings
from libshared.resources import PodRequest
from tests.bus.test_admission import admission, pod_spec, review
from vslice import running


def test_the_review_cap_cites_kubernetes_and_fits_the_budget() -> None:
    tp, cap = payloads.CAPPED["vslice.admission.review"]
    assert tp is events.AdmissionReview
    assert cap == events.MAX_REVIEW_BYTES <= payloads.MAX_VALUE_BYTES
    assert payloads.UNBOUNDED == {}


async def test_a_review_over_the_byte_cap_is_refused_before_decoding_and_the_next_answered(
    nc: Client, bus_settings: BusSettings
) -> None:
    spec = pod_spec({"nvidia.com/gpu": 1})
    big = events.ENCODER.encode(events.AdmissionReview(pod=spec))
    # padded past the cap with a field the review ignores, still a valid review
    spec["metadata"]["annotations"] = {"pad": "x" * (events.MAX_REVIEW_BYTES - len(big))}
    over = events.ENCODER.encode(events.AdmissionReview(pod=spec))
    assert len(over) > events.MAX_REVIEW_BYTES
    async with admission(bus_settings):
        refused = await review(nc, bus_settings, over)
        assert isinstance(refused, events.BusError)
        assert f"request of {len(over)} bytes is over {events.MAX_REVIEW_BYTES}" in refused.reason
        answered = await review(nc, bus_settings, events.ENCODER.encode(pod_spec({})))
        assert isinstance(answered, PodRequest)


@pytest.mark.parametrize(
    ("answer", "field"),
    [
        (
            events.Ready(pod_uid="run-b", node="n1", env={"main": {"LD_PRELOAD": "/é.so"}}),
            "$.env[...][...]",  # msgspec names no key of a mapping
        ),
        (
            events.Ready(
                pod_uid="run-b",
                node="n1",
                env={"main": {f"V{i}": "1" for i in range(bounds.MAX_ENV_VARS + 1)}},
            ),
            "$.env[...]",
        ),
        (
            events.Failed(pod_uid="run-b", node="n1", reason="x" * (bounds.MAX_TEXT + 1)),
            "$.reason",
        ),
    ],
)
async def test_vslice_run_refuses_an_answer_over_its_bounds_naming_the_field_then_takes_a_good_one(
    nc: Client,
    bus_settings: BusSettings,
    caplog: pytest.LogCaptureFixture,
    answer: events.Ready | events.Failed,
    field: str,
) -> None:
    good = events.Ready(pod_uid="run-b", node="n1", env={"main": {"LD_PRELOAD": "/v.so"}})
    sent = [answer, good]

    async def node_agent(msg: Msg) -> None:
        await msg.respond(events.ENCODER.encode(sent.pop(0)))

    sub = await nc.subscribe(bus_settings.subjects.node_slice("n1"), cb=node_agent)
    caplog.set_level(logging.WARNING, logger="vslice.run")
    try:
        with pytest.raises(running.RunError) as refused:
            await running.ask_node(nc, bus_settings, "n1", uid="run-b", wait_s=1)
        assert f"refused {field}" in str(refused.value)
        assert any(getattr(r, "error", "").startswith(field) for r in caplog.records)
        assert await running.ask_node(nc, bus_settings, "n1", uid="run-b", wait_s=1) == good
    finally:
        await sub.unsubscribe()
