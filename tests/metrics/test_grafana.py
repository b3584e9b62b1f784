"""``k8s/metrics/grafana-dashboard.json``: valid Grafana JSON whose every query names a
series the exporter serves (so no panel stays empty for a typo or a renamed metric)."""

from __future__ import annotations

import json
import re
import time
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from libshared import events
from services.metrics.adapters.bus import Instruments
from services.metrics.adapters.http import ViewCollector
from services.metrics.core.views import FleetView
from tests.bus.conftest import repo_root
from tests.metrics import fixtures as fx

DASHBOARD = repo_root() / "k8s" / "metrics" / "grafana-dashboard.json"
METRIC = re.compile(r"\b((?:hami|vslice)_[a-z_]+)\b")
SELECTOR = re.compile(r"\b((?:hami|vslice)_[a-z_]+)\{([^}]*)\}")
MATCHER = re.compile(r"([a-z_]+)\s*(?:=~|!~|!=|=)")


def served_labels() -> dict[str, set[str]]:
    """Every sample name a fully fed exporter serves, with its label names."""
    now = time.time()
    view = FleetView()
    view.put_node("n1", fx.registration("n1", fx.device("G0", 0)))
    s = fx.slice_of("a", "G0")
    view.put_ledger("n1", fx.ledger("n1", s), 1)
    host = events.DeviceUsage(
        uuid="G0", index=0, type="T", used_bytes=1, total_bytes=2, utilization_percent=5.0
    )
    line = fx.line(s, used_bytes=1, utilization=3.0, last_kernel_at=now - 1)
    view.put_usage("n1", fx.usage("n1", now, line, devices=(host,)), received_at=now)
    view.put_stats(events.Stats(name="r1"), received_at=now)
    registry = CollectorRegistry(auto_describe=False)
    instruments = Instruments.create(registry)
    instruments.latency.observe(0.01)
    instruments.rejected.labels(source="usage").inc()
    registry.register(ViewCollector(view=view, usage_ttl_s=30, stats_ttl_s=30))
    text = generate_latest(registry).decode()
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


def served_names() -> set[str]:
    """Every sample name a fully fed exporter serves."""
    return set(served_labels())


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def test_every_query_of_the_grafana_dashboard_names_a_series_the_exporter_serves() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    served = served_names()
    used = set()
    for panel in panels(dashboard):
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = METRIC.findall(target["expr"])
            assert names, (panel["title"], target["expr"])
            assert set(names) <= served, (panel["title"], set(names) - served)
            used.update(names)
    # HAMi's names carry over, so HAMi dashboards and these panels read the same series
    assert {"hami_gpu_memory_allocated_bytes", "hami_vgpu_memory_used_bytes"} <= used
    assert "vslice_scheduling_latency_seconds_bucket" in used


def test_every_label_a_query_selects_on_is_a_label_of_that_series() -> None:
    # a matcher on a label the series lacks (HAMi's per-container series carry no node)
    # selects nothing once the variable names one value: the panel would stay empty
    dashboard = json.loads(DASHBOARD.read_text())
    served = served_labels()
    checked = 0
    for panel in panels(dashboard):
        for target in panel["targets"]:
            for name, matchers in SELECTOR.findall(target["expr"]):
                for label in MATCHER.findall(matchers):
                    assert label in served[name], (panel["title"], name, label)
                    checked += 1
    assert checked > 10


def test_the_grafana_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"] == "vslice-fleet"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "node"}
    for panel in panels(dashboard):
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
