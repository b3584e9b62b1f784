"""The dashboard in a real browser (Debian's chromium, headless, driven by playwright): after
a small replay over the bus, the page shows every node, GPU and slice the ledger holds, who
holds each slice, and the fragmentation figure; it refreshes itself when the ledger changes.
A screenshot is saved under ``test-artifacts/`` (``$VSLICE_TEST_ARTIFACTS`` overrides)."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from playwright.async_api import Browser, Page, async_playwright

from libshared import events
from libshared.connecting import BusSettings
from libshared.ledgers import NodeLedger
from tests.bus import helpers
from tests.bus.conftest import repo_root
from tests.metrics import fixtures as fx
from tests.metrics import stack

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


SHOWN = """() => [...document.querySelectorAll('[data-node]')].map(n => ({
  node: n.dataset.node,
  devices: [...n.querySelectorAll('[data-device]')].map(d => ({
    uuid: d.dataset.device,
    slices: [...d.querySelectorAll('[data-slice]')].map(s => ({
      pod_uid: s.dataset.podUid, container: s.dataset.container,
      memory_mib: Number(s.dataset.memoryMib), cores: Number(s.dataset.cores),
      holder: s.querySelector('td').textContent})).sort((a, b) => a.pod_uid < b.pod_uid ? -1 : 1)
  }))
}))"""


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


async def shown_when(page: Page, want: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the page shows once it matches ``want`` (or after 10 s, whatever it shows)."""
    deadline = time.monotonic() + 10
    while True:
        got: list[dict[str, Any]] = await page.evaluate(SHOWN)
        if got == want or time.monotonic() > deadline:
            return got
        await page.wait_for_timeout(100)


async def test_the_dashboard_shows_the_nodes_gpus_and_slices_of_the_ledger(
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
        assert await shown_when(page, want) == want
        row = f"[data-slice='{some.pod_uid}/{some.container}']"
        used = await page.text_content(f"{row} td:nth-child(4)")
        assert used == f"{int(some.memory_mib / 2 + 0.5)} MiB"  # the usage report's figure
        assert await page.text_content(f"{row} td:nth-child(6)") == "40 %"
        ratio = await page.get_attribute("#fragmentation", "data-ratio")
        assert ratio is not None and 0 <= float(ratio) <= 100
        assert "%" in (await page.text_content("#fragmentation-ratio") or "")
        await page.screenshot(path=str(artifacts() / "dashboard.png"), full_page=True)

        # it refreshes itself: a released pod leaves the page without a reload
        assert isinstance(await helpers.release(nc, bus_settings, some.pod_uid), events.Ack)
        after = ledger_view(await helpers.ledgers(nc, bus_settings), nodes=3, gpus=2)
        assert after != want
        assert await shown_when(page, after) == after
