"""The dashboard's JSON API at fleet scale: a summary with fleet-wide allocation and FGD
fragmentation, pages of nodes filtered, sorted and bounded in size, one node's detail,
slices marked stale when their usage reports stop, the last hour's history, the favicon.
Served by the metrics service's HTTP application over a fleet view without a bus."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from services.metrics.core import dashboards
from services.metrics.core.views import FleetView
from tests.metrics import dashfleet
from tests.metrics import fixtures as fx


async def fetch(url: str) -> tuple[int, str, bytes]:
    """Status, content type and body of a GET."""

    def get() -> tuple[int, str, bytes]:
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                return response.status, response.headers["Content-Type"], response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, exc.headers["Content-Type"], exc.read()

    return await asyncio.to_thread(get)


async def get_json(url: str) -> Any:
    status, _, body = await fetch(url)
    assert status == 200, body
    return json.loads(body)


@pytest.fixture(scope="module")
def big() -> tuple[FleetView, int]:
    view = FleetView()
    return view, dashfleet.populate(view, dashfleet.fleet_nodes())


async def test_pages_of_nodes_cover_the_fleet_once_each_and_stay_small(
    big: tuple[FleetView, int],
) -> None:
    view, _ = big
    async with dashfleet.serving(view) as url:
        seen: list[str] = []
        offset = 0
        while True:
            status, _, body = await fetch(f"{url}/api/nodes?offset={offset}&limit=200")
            assert status == 200 and len(body) < 100_000
            page = json.loads(body)
            assert page["total"] == len(view.nodes)
            seen += [n["node"] for n in page["nodes"]]
            offset += 200
            if offset >= page["total"]:
                break
        assert seen == sorted(view.nodes)  # each once, by name
        _, _, summary = await fetch(f"{url}/api/summary")
        _, _, first = await fetch(f"{url}/api/nodes")
        assert len(summary) + len(first) < 50_000  # what the page loads, against ~1 MB before


@pytest.mark.parametrize(
    ("query", "holds"),
    [
        ("node=node-00", lambda n, d: "node-00" in n["node"]),
        ("type=t4", lambda n, d: n["types"] == ["T4"]),
        ("namespace=team-3", lambda n, d: any(s["namespace"] == "team-3" for s in slices(d))),
        ("pod=-p0-2", lambda n, d: any(s["pod"].endswith("-p0-2") for s in slices(d))),
        ("namespace=team-3&type=a10", lambda n, d: "A10" in n["types"]),
    ],
)
async def test_a_filter_keeps_exactly_the_nodes_that_match(
    big: tuple[FleetView, int], query: str, holds: Any
) -> None:
    view, _ = big
    async with dashfleet.serving(view) as url:
        page = await get_json(f"{url}/api/nodes?{query}&limit=500")
        assert 0 < page["total"] < len(view.nodes)
        for n in page["nodes"][:40]:
            detail = await get_json(f"{url}/api/nodes/{n['node']}")
            assert holds(n, detail), (query, n["node"])
        # and no node left out: count the matches from the view itself
        snap = view.snapshot(now=time.time(), usage_ttl_s=dashfleet.USAGE_TTL_S)
        everything = dashboards.node_page(
            snap, dashboards.NodeQuery(limit=500), now=time.time(), tracker=dashboards.Tracker()
        )
        assert page["total"] < everything["total"]


def slices(detail: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for d in detail["devices"] for s in d["slices"]]


@pytest.mark.parametrize("key", ["memory", "cores", "slices", "free"])
async def test_a_descending_sort_orders_the_whole_fleet_before_paging(
    big: tuple[FleetView, int], key: str
) -> None:
    view, _ = big
    field = dashboards.SORT_KEYS[key]
    async with dashfleet.serving(view) as url:
        top = await get_json(f"{url}/api/nodes?sort=-{key}&limit=20")
        rest = await get_json(f"{url}/api/nodes?sort=-{key}&offset=20&limit=500")
        values = [n[field] for n in top["nodes"] + rest["nodes"]]
        assert values == sorted(values, reverse=True)
        assert values[0] > values[-1]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=ten", "limit"),
        ("offset=-1", "offset"),
        ("sort=size", "sort"),
        ("node=" + "x" * 300, "node"),
    ],
)
async def test_a_bad_page_parameter_is_answered_400_naming_it(query: str, field: str) -> None:
    async with dashfleet.serving(FleetView()) as url:
        status, kind, body = await fetch(f"{url}/api/nodes?{query}")
    assert status == 400 and kind.startswith("application/json")
    answer = json.loads(body)
    assert answer["field"] == field and answer["error"].startswith(f"{field}=")


async def test_a_nodes_detail_has_its_gpus_and_slices_and_an_unknown_node_is_404() -> None:
    view = FleetView()
    view.put_node("n-1", fx.registration("n-1", fx.device("G-0", 0), fx.device("G-1", 1)))
    view.put_ledger("n-1", fx.ledger("n-1", fx.slice_of("p1", "G-1", index=1, cores=0)), 1)
    async with dashfleet.serving(view) as url:
        detail = await get_json(f"{url}/api/nodes/n-1")
        status, _, _ = await fetch(f"{url}/api/nodes/n-2")
    assert [d["uuid"] for d in detail["devices"]] == ["G-0", "G-1"]
    assert detail["devices"][1]["slices"][0]["pod_uid"] == "p1"
    assert detail["devices"][1]["allocated_mib"] == 4000 and detail["memory_mib"] == 4000
    assert status == 404


async def test_a_slice_whose_usage_reports_stop_is_marked_stale() -> None:
    now = [1000.0]
    view = FleetView()
    live, leaked = fx.slice_of("live", "G-0"), fx.slice_of("leaked", "G-0")
    view.put_node("n-1", fx.registration("n-1", fx.device("G-0", 0)))
    view.put_ledger("n-1", fx.ledger("n-1", live, leaked), 1)
    lines = [fx.line(s, used_bytes=fx.MIB) for s in (live, leaked)]
    view.put_usage("n-1", fx.usage("n-1", 1000.0, *lines), received_at=1000.0)
    async with dashfleet.serving(view, clock=lambda: now[0], history_interval_s=3600) as url:
        before = await get_json(f"{url}/api/nodes/n-1")
        assert [s["stale"] for s in before["devices"][0]["slices"]] == [False, False]
        # the container of "leaked" is gone: the next report has only "live"
        now[0] = 1010.0
        view.put_usage("n-1", fx.usage("n-1", 1010.0, lines[0]), received_at=1010.0)
        after = await get_json(f"{url}/api/nodes/n-1")
        summary = await get_json(f"{url}/api/summary")
        page = await get_json(f"{url}/api/nodes?sort=-stale")
    assert {s["pod_uid"]: s["stale"] for s in after["devices"][0]["slices"]} == {
        "leaked": True,
        "live": False,
    }
    assert summary["stale_slices"] == 1 and page["nodes"][0]["stale"] == 1


def test_a_slice_that_never_reported_usage_is_not_stale() -> None:
    view = FleetView()
    view.put_node("n-1", fx.registration("n-1", fx.device("G-0", 0)))
    view.put_ledger("n-1", fx.ledger("n-1", fx.slice_of("quiet", "G-0")), 1)
    tracker = dashboards.Tracker()
    snap = view.snapshot(now=10.0, usage_ttl_s=30.0)
    assert dashboards.summary(snap, now=10.0, tracker=tracker)["stale_slices"] == 0


async def test_the_summary_gives_fleet_allocation_and_fgd_fragmentation() -> None:
    view = FleetView()
    view.put_node("n-1", fx.registration("n-1", fx.device("G-0", 0), fx.device("G-1", 1)))
    # two small slices, one on each GPU: a whole-GPU measure calls every idle GPU share
    # fragmented (100 %); against the workload that holds them (small slices), none is
    view.put_ledger(
        "n-1",
        fx.ledger(
            "n-1", fx.slice_of("a", "G-0", cores=10), fx.slice_of("b", "G-1", index=1, cores=10)
        ),
        1,
    )
    async with dashfleet.serving(view) as url:
        summary = await get_json(f"{url}/api/summary")
    assert (summary["gpus"], summary["slices"], summary["nodes"]) == (2, 2, 1)
    assert summary["memory_allocated_percent"] == 25.0  # 8000 of 32000 MiB
    assert summary["cores_allocated_percent"] == 10.0
    frag = summary["fragmentation"]
    assert frag["measure"] == "fgd" and frag["shapes"] == 1
    assert frag["ratio_percent"] == 0.0 and frag["free_gpus"] == 1.5
    snap = view.snapshot(now=0.0, usage_ttl_s=30.0)
    whole_gpu = [d.free_milli for d in snap.devices]
    assert all(0 < share < 1000 for share in whole_gpu)  # the old measure's 100 %


async def test_the_history_samples_the_fleet_and_keeps_the_last_hour() -> None:
    view = FleetView()
    view.put_node("n-1", fx.registration("n-1", fx.device("G-0", 0)))
    async with dashfleet.serving(view, history_interval_s=0.02) as url:
        points: list[list[float]] = []
        deadline = time.monotonic() + 20
        while len(points) < 3:
            assert time.monotonic() < deadline, points
            view.put_ledger("n-1", fx.ledger("n-1", fx.slice_of(f"p{len(points)}", "G-0")), 0)
            summary = await get_json(f"{url}/api/summary")
            points = summary["history"]["points"]
            await asyncio.sleep(0.05)
    fields = summary["history"]["fields"]
    assert fields == list(dashboards.HISTORY_FIELDS)
    memory = [p[fields.index("memory_percent")] for p in points]
    assert max(memory) == 25.0  # 4000 of 16000 MiB
    tracker = dashboards.Tracker()
    snap = view.snapshot(now=0.0, usage_ttl_s=30.0)
    for t in range(0, 7200, 10):
        tracker.record(snap, now=float(t))
    assert len(tracker.history) == 361 and tracker.history[0][0] == 7190.0 - 3600


async def test_the_favicon_is_served() -> None:
    async with dashfleet.serving(FleetView()) as url:
        for path in ("/favicon.ico", "/favicon.svg"):
            status, kind, body = await fetch(url + path)
            assert status == 200 and kind == "image/svg+xml" and body.startswith(b"<svg")


def test_the_tracker_forgets_a_released_slice_when_it_records() -> None:
    view = FleetView()
    held = fx.slice_of("p", "G-0")
    view.put_node("n-1", fx.registration("n-1", fx.device("G-0", 0)))
    view.put_ledger("n-1", fx.ledger("n-1", held), 1)
    view.put_usage("n-1", fx.usage("n-1", 5.0, fx.line(held, used_bytes=1)), received_at=5.0)
    tracker = dashboards.Tracker()
    tracker.record(view.snapshot(now=5.0, usage_ttl_s=30.0), now=5.0)
    assert list(tracker.seen) == [("p", "main", "G-0")]
    view.put_ledger("n-1", fx.ledger("n-1"), 2)
    tracker.record(view.snapshot(now=15.0, usage_ttl_s=30.0), now=15.0)
    assert tracker.seen == {}
