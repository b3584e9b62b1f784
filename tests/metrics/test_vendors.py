"""Devices of every vendor in ``/metrics`` and on the dashboard: a Hygon DCU keeps HAMi's
families with its type in ``device_type`` (HAMi's label sets unchanged), and is told from
an NVIDIA GPU by vslice's ``vslice_device_info`` (``device_vendor``, ``vendor``) and the
per-vendor totals; the dashboard's JSON gives each device's vendor and maker and the
summary per vendor. A registration's vendor word no vendor has is shown as it came, with
maker ``unknown``; one outside ``bounds.Vendor`` is refused at the door, naming it.
Served by the metrics service's HTTP application over a fleet view without a bus."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from libshared import quarantines
from services.metrics.core.views import FleetView, RejectedValue
from tests.metrics import dashfleet
from tests.metrics import fixtures as fx
from tests.metrics.promtext import labelled, samples
from tests.metrics.test_dashboard_api import fetch, get_json


async def scrape(url: str) -> str:
    status, _, body = await fetch(f"{url}/metrics")
    assert status == 200, body
    return body.decode()


async def test_a_dcu_and_its_slice_are_in_hamis_families_with_their_type_and_hamis_labels() -> None:
    async with dashfleet.serving(fx.mixed_vendors()) as url:
        text = await scrape(url)
    d0 = {"node": "d1", "device_uuid": "D0", "device_index": "0", "device_type": "DCU-Z100"}
    assert labelled("hami_gpu_memory_limit_bytes", text, **d0) == [fx.Z100_MIB * fx.MIB]
    assert labelled("hami_gpu_memory_allocated_bytes", text, **d0) == [8192 * fx.MIB]
    assert labelled("hami_gpu_core_allocated_ratio", text, **d0) == [30]
    assert labelled("hami_gpu_shared_count", text, **d0) == [1]
    # HAMi's label set, no more: a HAMi dashboard's queries read a DCU as they read a GPU
    (d0_labels,) = [
        k for k in samples(text, "hami_gpu_memory_limit_bytes") if ("device_uuid", "D0") in k
    ]
    assert {name for name, _ in d0_labels} == {*d0, "zone"}
    assert labelled(
        "hami_vgpu_memory_allocated_bytes", text, node="d1", pod="pod-dcu", device_uuid="D0"
    ) == [8192 * fx.MIB]
    assert labelled("hami_vgpu_core_allocated_ratio", text, pod="pod-dcu") == [30]


async def test_each_device_has_its_vendor_and_maker_and_each_vendor_its_totals() -> None:
    async with dashfleet.serving(fx.mixed_vendors()) as url:
        text = await scrape(url)
    info = {
        dict(k)["device_uuid"]: dict(k)
        for k, v in samples(text, "vslice_device_info").items()
        if v == 1
    }
    assert info == {
        "G0": {
            "node": "n1",
            "device_uuid": "G0",
            "device_index": "0",
            "device_type": "NVIDIA-A100",
            "mode": "hami-core",
            "device_vendor": "NVIDIA",
            "vendor": "NVIDIA",
        },
        "D0": {
            "node": "d1",
            "device_uuid": "D0",
            "device_index": "0",
            "device_type": "DCU-Z100",
            "mode": "hami-core",
            "device_vendor": "DCU",
            "vendor": "Hygon",
        },
        "D1": {
            "node": "d1",
            "device_uuid": "D1",
            "device_index": "1",
            "device_type": "DCU-K100",
            "mode": "hami-core",
            "device_vendor": "DCU",
            "vendor": "Hygon",
        },
    }
    dcu = {"device_vendor": "DCU", "vendor": "Hygon"}
    nvidia = {"device_vendor": "NVIDIA", "vendor": "NVIDIA"}
    assert labelled("vslice_vendor_devices", text, **dcu) == [2]
    assert labelled("vslice_vendor_devices", text, **nvidia) == [1]
    assert labelled("vslice_vendor_memory_limit_bytes", text, **dcu) == [
        (fx.Z100_MIB + fx.K100_MIB) * fx.MIB
    ]
    assert labelled("vslice_vendor_memory_allocated_bytes", text, **dcu) == [8192 * fx.MIB]
    assert labelled("vslice_vendor_memory_allocated_bytes", text, **nvidia) == [4000 * fx.MIB]
    assert labelled("vslice_vendor_slices", text, **dcu) == [1]


async def test_the_dashboard_json_gives_each_device_its_vendor_and_the_summary_each_vendor() -> (
    None
):
    async with dashfleet.serving(fx.mixed_vendors()) as url:
        fleet = await get_json(f"{url}/api/fleet")
        summary = await get_json(f"{url}/api/summary")
        page = await get_json(f"{url}/api/nodes?type=dcu")
        detail = await get_json(f"{url}/api/nodes/d1")
    devices = {d["uuid"]: d for n in fleet["nodes"] for d in n["devices"]}
    assert {u: (d["type"], d["vendor"], d["brand"]) for u, d in devices.items()} == {
        "G0": ("NVIDIA-A100", "NVIDIA", "NVIDIA"),
        "D0": ("DCU-Z100", "DCU", "Hygon"),
        "D1": ("DCU-K100", "DCU", "Hygon"),
    }
    assert [(s["pod"], s["memory_mib"]) for s in devices["D0"]["slices"]] == [("pod-dcu", 8192)]
    assert summary["vendors"] == [
        {
            "vendor": "DCU",
            "brand": "Hygon",
            "gpus": 2,
            "memory_mib": 8192,
            "memory_total_mib": fx.Z100_MIB + fx.K100_MIB,
            "slices": 1,
        },
        {
            "vendor": "NVIDIA",
            "brand": "NVIDIA",
            "gpus": 1,
            "memory_mib": 4000,
            "memory_total_mib": 16000,
            "slices": 1,
        },
    ]
    assert summary["gpus"] == 3
    assert [(n["node"], n["brands"]) for n in page["nodes"]] == [("d1", ["Hygon"])]
    assert [d["brand"] for d in detail["devices"]] == ["Hygon", "Hygon"]


async def test_a_vendor_word_no_vendor_has_is_shown_as_it_came_with_an_unknown_maker() -> None:
    view = FleetView()
    view.put_node("x1", fx.registration("x1", fx.device("X0", 0, type="ACME-1", vendor="ACME")))
    async with dashfleet.serving(view) as url:
        text = await scrape(url)
        fleet = await get_json(f"{url}/api/fleet")
    assert labelled(
        "vslice_device_info", text, device_uuid="X0", device_vendor="ACME", vendor="unknown"
    ) == [1]
    assert labelled("vslice_vendor_devices", text, device_vendor="ACME", vendor="unknown") == [1]
    assert labelled("hami_gpu_memory_limit_bytes", text, device_type="ACME-1") == [16000 * fx.MIB]
    (device,) = fleet["nodes"][0]["devices"]
    assert (device["vendor"], device["brand"]) == ("ACME", "unknown")


def _with_vendor(word: Any) -> bytes:
    raw = json.loads(fx.registration("x1", fx.device("X0", 0)))
    raw["devices"][0]["vendor"] = word
    return msgspec.json.encode(raw)


@pytest.mark.parametrize(
    "word",
    ["", "NV-IDIA", "A" * 17, '"><script>', "1DCU", 7],
    ids=["empty", "dash", "too-long", "markup", "digit-first", "number"],
)
def test_a_vendor_word_outside_its_bounds_is_refused_at_the_door_naming_it(word: Any) -> None:
    view = FleetView()
    with pytest.raises(RejectedValue) as refused:
        view.put_node("x1", _with_vendor(word))
    assert f"$.devices[0].vendor={word!r}" in refused.value.reason
    assert "x1" not in view.nodes
    assert quarantines.REGISTRATION_UNREADABLE in view.quarantined["x1"]
