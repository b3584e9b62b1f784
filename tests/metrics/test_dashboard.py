"""The dashboard in a real browser (Debian's chromium, headless, driven by playwright): after
a small replay over the bus, the page lists every node and opens each to the GPUs and
slices the ledger holds, who holds each slice, and the fragmentation figure; it refreshes
itself when the ledger changes. On the openb fleet (1,213 nodes), the page loads within
its budgets (first paint <= 2 s, <= 500 KB transferred; the time until the fleet's
figures are drawn is recorded) and is paged, searched and
drilled into. Screenshots and the measured figures are saved under ``test-artifacts/``
(``$VSLICE_TEST_ARTIFACTS`` overrides)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from playwright.async_api import Browser, Page, Request, async_playwright

from libshared import events
from libshared.connecting import BusSettings
from libshared.ledgers import NodeLedger
from services.metrics.core.views import FleetView
from tests.bus import helpers
from tests.bus.conftest import repo_root
from tests.metrics import dashfleet, stack
from tests.metrics import fixtures as fx

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package, installed by `make chromium`
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Outside CI a machine may lack chromium (`make chromium` installs it); in CI it must fail.
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists() and not os.environ.get("CI"),
    reason="no /usr/bin/chromium (`make chromium` installs it; CI always has it)",
)


def artifacts() -> Path:
    out = Path(os.environ.get("VSLICE_TEST_ARTIFACTS") or repo_root() / "test-artifacts")
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        launched = await p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


SHOWN = (
    """() => [...document.querySelectorAll('#nodes tbody [data-node]')].map(n => n.dataset.node)"""
)
DETAIL = """() => {
  const aside = document.querySelector('#detail');
  if (aside.hidden || !aside.dataset.node) return null;
  return {node: aside.dataset.node,
    devices: [...aside.querySelectorAll('[data-device]')].map(d => ({
      uuid: d.dataset.device,
      slices: [...d.querySelectorAll('[data-slice]')].map(s => ({
        pod_uid: s.dataset.podUid, container: s.dataset.container,
        memory_mib: Number(s.dataset.memoryMib), cores: Number(s.dataset.cores),
        holder: s.querySelector('td').textContent})).sort((a, b) => a.pod_uid < b.pod_uid ? -1 : 1)
    }))};
}"""


def ledger_view(ledgers: dict[str, NodeLedger], nodes: int, gpus: int) -> list[dict[str, Any]]:
    """What the page must show: every node and GPU of the fleet, each GPU's slices."""
    out = []
    for n in range(nodes):
        node = f"node-{n}"
        held = ledgers.get(node, NodeLedger(node=node)).slices
        devices = []
        for g in range(gpus):
            uuid = f"GPU-{n}-{g}"
            slices = sorted(
                (
                    {
                        "pod_uid": s.pod_uid,
                        "container": s.container,
                        "memory_mib": s.memory_mib,
                        "cores": s.cores_percent,
                        "holder": f"{s.namespace}/{s.pod}",
                    }
                    for s in held
                    if s.uuid == uuid
                ),
                key=lambda s: str(s["pod_uid"]),
            )
            devices.append({"uuid": uuid, "slices": slices})
        out.append({"node": node, "devices": devices})
    return out


async def shown_when(page: Page, script: str, want: object, timeout_s: float = 10) -> object:
    """What ``script`` reads from the page once it equals ``want`` (or after ``timeout_s``,
    whatever it reads)."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = await page.evaluate(script)
        if got == want or time.monotonic() > deadline:
            return got
        await page.wait_for_timeout(100)


async def test_the_dashboard_lists_the_nodes_and_opens_each_to_its_gpus_and_slices(
    nc: Client, bus_settings: BusSettings, browser: Browser
) -> None:
    await helpers.register(nc, bus_settings, helpers.fleet(nodes=3, gpus=2, split=4))
    async with (
        stack.admission(bus_settings),
        stack.schedulers(bus_settings, 1),
        stack.metrics(bus_settings) as url,
    ):
        driven = await stack.replay(bus_settings, stack.pods(12))
        assert sum(driven.placed) >= 4
        ledgers = await helpers.ledgers(nc, bus_settings)
        held = [s for ld in ledgers.values() for s in ld.slices]
        some = min(held, key=lambda s: (s.memory_mib, s.pod_uid))  # a fractional one
        node = next(n for n, ld in ledgers.items() if some in ld.slices)
        line = fx.line(some, used_bytes=some.memory_mib * fx.MIB // 2, utilization=40.0)
        report = fx.usage(node, time.time(), line)
        await nc.publish(bus_settings.subjects.usage(node), report)

        page = await browser.new_page(viewport={"width": 1400, "height": 900})
        await page.goto(url + "/?refresh=300")
        await page.wait_for_selector("body[data-loaded='1']", timeout=10_000)
        want = ledger_view(ledgers, nodes=3, gpus=2)
        assert await shown_when(page, SHOWN, [n["node"] for n in want]) == [n["node"] for n in want]
        for expected in want:
            await page.click(f"#nodes tbody [data-node='{expected['node']}']")
            assert await shown_when(page, DETAIL, expected) == expected
        await page.click(f"#nodes tbody [data-node='{node}']")
        row = f"#detail [data-slice='{some.pod_uid}/{some.container}']"
        await page.wait_for_selector(row, timeout=10_000)
        used = await page.text_content(f"{row} td:nth-child(4)")
        assert used == f"{int(some.memory_mib / 2 + 0.5):,} MiB"  # the usage report's figure
        assert await page.text_content(f"{row} td:nth-child(6)") == "40 %"
        ratio = await page.get_attribute("#fragmentation", "data-ratio")
        assert ratio is not None and 0 <= float(ratio) <= 100
        assert "%" in (await page.text_content("#fragmentation-ratio") or "")
        slices = await page.get_attribute("#slices", "data-value")
        assert slices == str(len(held))
        await page.screenshot(path=str(artifacts() / "dashboard.png"), full_page=True)

        # it refreshes itself: a released pod leaves the open node without a reload
        assert isinstance(await helpers.release(nc, bus_settings, some.pod_uid), events.Ack)
        after = ledger_view(await helpers.ledgers(nc, bus_settings), nodes=3, gpus=2)
        opened = next(n for n in after if n["node"] == node)
        assert opened != next(n for n in want if n["node"] == node)
        assert await shown_when(page, DETAIL, opened) == opened


FIRST_PAINT_BUDGET_MS = 2000  # navigation to the first contentful paint
TRANSFER_BUDGET_BYTES = 500_000
# The time to the fleet's figures and first page of nodes drawn is recorded beside them
# (test-artifacts/dashboard-fleet.json), not asserted: on a shared machine it follows the
# load; benchmarks/metrics.py prints the server's share of it.


async def test_a_1200_node_fleet_loads_in_budget_and_is_searched_paged_and_opened(
    browser: Browser,
) -> None:
    view = FleetView()
    slices = dashfleet.populate(view, dashfleet.fleet_nodes())
    nodes = sorted(view.nodes)
    assert len(nodes) > 1000
    async with dashfleet.serving(view, history_interval_s=600) as url:
        page = await browser.new_page(viewport={"width": 1400, "height": 1000})
        sizes: list[int] = []

        async def finished(request: Request) -> None:
            got = await request.sizes()
            sizes.append(got["responseBodySize"] + got["responseHeadersSize"])

        page.on("requestfinished", finished)
        await page.goto(url + "/?refresh=60000")
        await page.wait_for_selector("body[data-loaded='1']", timeout=30_000)
        first_data_ms = int(await page.get_attribute("body", "data-first-data-ms") or 0)
        paint = await page.evaluate(
            "() => (performance.getEntriesByName('first-contentful-paint')[0] || {}).startTime"
        )
        await page.wait_for_timeout(300)  # the favicon's request, after load
        transferred = sum(sizes)
        figures = {
            "nodes": len(nodes),
            "slices": slices,
            "first_contentful_paint_ms": paint,
            "first_data_ms": first_data_ms,
            "transferred_bytes": transferred,
            "requests": len(sizes),
        }
        (artifacts() / "dashboard-fleet.json").write_text(json.dumps(figures, indent=1))
        await page.screenshot(path=str(artifacts() / "dashboard-fleet.png"), full_page=True)
        print(f"\n[dashboard] openb fleet: {figures}")
        assert transferred <= TRANSFER_BUDGET_BYTES, figures
        assert paint is not None and paint <= FIRST_PAINT_BUDGET_MS, figures
        assert first_data_ms > 0, figures

        # the fleet's figures and one page of nodes, not the fleet
        assert await page.get_attribute("#slices", "data-value") == str(slices)
        assert int(await page.get_attribute("#gpus", "data-value") or 0) == sum(
            len(view.nodes[n].devices) for n in nodes
        )
        assert await page.evaluate(SHOWN) == nodes[:50]
        assert await page.get_attribute("#page-info", "data-total") == str(len(nodes))
        assert int(await page.get_attribute("#history svg", "data-points") or 0) >= 1

        # paging
        await page.click("#next")
        assert await shown_when(page, SHOWN, nodes[50:100]) == nodes[50:100]
        # search by node name, then by GPU type
        target = nodes[421]
        await page.fill("#filters [name=node]", target)
        assert await shown_when(page, SHOWN, [target]) == [target]
        await page.fill("#filters [name=node]", "")
        await page.fill("#filters [name=type]", "V100M32")
        v100 = [n for n in nodes if any(d.type == "V100M32" for d in view.nodes[n].devices)]
        assert await shown_when(page, SHOWN, v100[:50]) == v100[:50]
        assert await page.get_attribute("#page-info", "data-total") == str(len(v100))
        # drill down into one node
        await page.click(f"#nodes tbody [data-node='{v100[3]}']")
        detail = await shown_when(
            page, "() => document.querySelector('#detail').dataset.node || null", v100[3]
        )
        assert detail == v100[3]
        devices = await page.evaluate(
            "() => [...document.querySelectorAll('#detail [data-device]')]"
            ".map(d => d.dataset.device)"
        )
        assert devices == [d.uuid for d in view.nodes[v100[3]].devices]
        await page.screenshot(path=str(artifacts() / "dashboard-fleet-node.png"), full_page=True)


async def test_a_dcu_shows_its_maker_beside_its_type_in_the_node_table_and_detail(
    browser: Browser,
) -> None:
    async with dashfleet.serving(fx.mixed_vendors()) as url:
        page = await browser.new_page(viewport={"width": 1400, "height": 900})
        await page.goto(url + "/?refresh=300&open=d1")
        await page.wait_for_selector("#detail [data-device='D1']", timeout=10_000)
        table = await page.text_content("#nodes tbody [data-node='d1'] [data-brands]")
        assert table == "Hygon: DCU-K100, DCU-Z100"
        nvidia = await page.text_content("#nodes tbody [data-node='n1'] [data-brands]")
        assert nvidia == "NVIDIA-A100"
        title = await page.text_content("#detail [data-device='D0'] [data-brand]")
        assert title is not None and title.startswith("Hygon GPU 0 DCU-Z100")
        vendors = await page.get_attribute("#gpus", "data-vendors")
        assert vendors == "DCU:2,NVIDIA:1"
        assert "Hygon 2" in (await page.text_content("#updated") or "")
