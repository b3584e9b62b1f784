"""Every metric HAMi v2.10 exports, as HAMi exports it: ``/metrics`` of a ``vslice up``
stack with a slice busy on a mock GPU is checked against ``hamicatalogue`` (HAMi's
catalogue written down from its source, file and line per row) for each family's name,
type and label names -- HAMi's current names and, with ``VSLICE_LEGACY_METRICS``, the
names of v2.8 and before.

The MIG families have no series (vslice has no MIG mode) and the quota families none on
this stack (no namespace has a quota): their label names are checked from the
exporter's declarations, and the quota families' from a scrape with a quota source.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.metrics.adapters.http import ViewCollector
from services.metrics.core import exporting
from services.metrics.core.views import FleetView
from tests.libvgpu import harness
from tests.metrics import hamicatalogue as catalogue
from tests.metrics.hamicatalogue import Row
from vslice import stacks

MIB = 1 << 20
GPU = "GPU-0a1b2c3d-0000-4000-8000-0000000ca7a1"
PROBE = [sys.executable, str(Path(__file__).parent / "programs" / "kernelprobe.py")]
ENV = {
    "VSLICE_MOCKGPU_DEVICES": f"{GPU}:4096",
    "VSLICE_USAGE_INTERVAL_S": "0.3",
    "VSLICE_GPU_BACKEND": "mock",
    "VSLICE_LEGACY_METRICS": "1",
}
NO_SERIES = catalogue.NO_MIG | catalogue.NO_QUOTA_SOURCE


def families(text: str) -> dict[str, tuple[str, set[frozenset[str]]]]:
    """Family name -> (type, the label-name sets of its samples)."""
    out: dict[str, tuple[str, set[frozenset[str]]]] = {}
    for family in text_string_to_metric_families(text):
        out[family.name] = (family.type, {frozenset(s.labels) for s in family.samples})
    return out


def expected_labels(row: Row) -> frozenset[str]:
    return frozenset(row.labels) | ({"zone"} if row.zone else set())


def scrape(url: str) -> str:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        return str(response.read().decode())


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """A ``vslice up`` stack on one mock GPU of 4096 MiB; (state dir, metrics URL)."""
    harness.build_native()
    state = tmp_path_factory.mktemp("stack")
    env = {**os.environ, **ENV}
    cli = [sys.executable, "-m", "vslice.cli"]
    started = subprocess.run(
        [*cli, "up", "--state-dir", str(state)],
        cwd=harness.ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        url = json.loads((state / stacks.STATE_FILE).read_text())["metrics_url"]
        yield state, url
    finally:
        subprocess.run(
            [*cli, "down", "--state-dir", str(state)],
            cwd=harness.ROOT,
            env=env,
            capture_output=True,
            timeout=60,
            check=False,
        )


def busy_scrape(state: Path, url: str) -> str:
    """A scrape taken while a ``vslice run`` slice of 1024 MiB holds 256 MiB and launches
    kernels on the mock GPU, once every family with series has them."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vslice.cli",
            "run",
            "--state-dir",
            str(state),
            "--gpumem",
            "1024",
            "--gpucores",
            "50",
            "--",
            *PROBE,
            "256",
            "60",
        ],
        cwd=harness.ROOT,
        env={**os.environ, **ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("held"), line + (proc.stderr.read() if proc.stderr else "")
        want = {r.name for r in catalogue.HAMI + catalogue.LEGACY} - NO_SERIES
        deadline = time.monotonic() + 30
        while True:
            text = scrape(url)
            found = families(text)
            missing = {n for n in want if not found.get(n, ("", set()))[1]}
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert not missing, f"families without series: {sorted(missing)}"
        return text
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_every_hami_metric_is_served_with_hamis_name_type_and_label_names(
    stack: tuple[Path, str],
) -> None:
    text = busy_scrape(*stack)
    found = families(text)
    rows = catalogue.HAMI + catalogue.LEGACY
    assert len(catalogue.HAMI) == 25 and len(catalogue.LEGACY) == 19
    for row in rows:
        assert row.name in found, f"{row.name} ({row.source}) is not served"
        kind, label_sets = found[row.name]
        assert kind == row.type, (row.name, kind, row.source)
        if row.name in NO_SERIES:
            assert label_sets == set(), row.name
        else:
            assert label_sets == {expected_labels(row)}, (row.name, row.source, label_sets)
    # the slice's own figures, as HAMi's monitor reports them
    used = [
        s
        for f in text_string_to_metric_families(text)
        if f.name == "hami_vgpu_memory_used_bytes"
        for s in f.samples
        if s.labels["device_uuid"] == GPU
    ]
    assert [s.value for s in used] == [256 * MIB]
    assert used[0].labels["vdevice_index"] == "0" and "node" not in used[0].labels
    # vslice's own families stay
    assert "vslice_fleet_fragmentation_ratio" in found


def test_the_exporter_declares_hamis_label_names_for_the_families_it_serves_without_series() -> (
    None
):
    declared = {name: labels for name, (_, labels) in exporting.HAMI.items()}
    declared.update({name: labels for name, (_, _, labels) in exporting.LEGACY.items()})
    for row in catalogue.HAMI + catalogue.LEGACY:
        if row.name != "hami_build_info":
            assert tuple(declared[row.name]) == row.labels, (row.name, row.source)
    assert set(declared) == {r.name for r in catalogue.HAMI + catalogue.LEGACY} - {
        "hami_build_info"
    }


def test_a_quota_source_gives_the_quota_families_series_with_hamis_labels() -> None:
    quotas = [
        exporting.Quota(namespace="team-a", resource="nvidia.com/gpumem", used=3000, limit=8000),
        exporting.Quota(
            namespace="team-b", resource="nvidia.com/gpu", used=1, limit=0, limit_set=False
        ),
    ]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(
        ViewCollector(
            view=FleetView(), usage_ttl_s=30, stats_ttl_s=30, legacy=True, quotas=lambda: quotas
        )
    )
    text = generate_latest(registry).decode()
    samples = {
        (f.name, frozenset(s.labels.items())): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    rows = {r.name: r for r in catalogue.HAMI + catalogue.LEGACY}
    for name in catalogue.NO_QUOTA_SOURCE:
        got = {frozenset(dict(k).keys()) for (n, k) in samples if n == name}
        assert got == {expected_labels(rows[name])}, name
    used = {"namespace": "team-a", "quota_name": "nvidia.com/gpumem", "limit": "8000"}
    assert samples["hami_resource_quota_used", frozenset({**used, "zone": "vGPU"}.items())] == 3000
    # a quota with no limit set has a usage series but no limit series, as in HAMi
    limits = {dict(k)["namespace"] for (n, k) in samples if n == "hami_resource_quota_limit"}
    assert limits == {"team-a"}
