"""The fleet view: bucket values and usage reports joined into nodes -> devices -> slices,
the ledger deciding which slices (and so which usage lines) exist."""

from __future__ import annotations

import pytest

from libshared import events
from libshared.devices import Device
from services.metrics.core import fragmentation
from services.metrics.core.views import FleetView, RejectedValue
from tests.metrics import fixtures as fx


def view_with_two_slices() -> tuple[FleetView, list]:
    view = FleetView()
    view.put_node("n1", fx.registration("n1", fx.device("G0", 0), fx.device("G1", 1)))
    a = fx.slice_of("a", "G0", memory_mib=4000, cores=25)
    b = fx.slice_of("b", "G0", memory_mib=2000, cores=10)
    view.put_ledger("n1", fx.ledger("n1", a, b), 3)
    return view, [a, b]


def test_a_device_sums_the_memory_and_cores_of_the_slices_the_ledger_gives_it() -> None:
    view, _ = view_with_two_slices()
    snap = view.snapshot(now=100.0, usage_ttl_s=30)
    g0, g1 = snap.nodes[0].devices
    assert (g0.uuid, g0.allocated_mib, g0.allocated_cores, len(g0.slices)) == ("G0", 6000, 35, 2)
    assert (g1.uuid, g1.allocated_mib, g1.allocated_cores, len(g1.slices)) == ("G1", 0, 0, 0)
    assert snap.ledger_seq == 3


def test_a_usage_line_appears_only_while_the_ledger_holds_its_slice() -> None:
    view, (a, b) = view_with_two_slices()
    view.put_usage(
        "n1",
        fx.usage("n1", 50.0, fx.line(a, used_bytes=7), fx.line(b, used_bytes=9)),
        received_at=90.0,
    )
    used = {
        s.slice.pod_uid: s.usage.used_bytes if s.usage else None
        for s in view.snapshot(now=100.0, usage_ttl_s=30).nodes[0].devices[0].slices
    }
    assert used == {"a": 7, "b": 9}
    view.put_ledger("n1", fx.ledger("n1", a), 4)  # b released; its line is still the latest
    slices = view.snapshot(now=100.0, usage_ttl_s=30).nodes[0].devices[0].slices
    assert [(s.slice.pod_uid, s.usage.used_bytes if s.usage else None) for s in slices] == [
        ("a", 7)
    ]


def test_a_usage_report_older_than_the_ttl_is_left_out() -> None:
    view, (a, _) = view_with_two_slices()
    view.put_usage("n1", fx.usage("n1", 50.0, fx.line(a, used_bytes=7)), received_at=60.0)
    assert view.snapshot(now=89.0, usage_ttl_s=30).nodes[0].usage_age_s == 29.0
    stale = view.snapshot(now=91.0, usage_ttl_s=30).nodes[0]
    assert stale.usage_age_s is None and stale.devices[0].slices[0].usage is None


def test_an_older_report_does_not_replace_a_newer_one() -> None:
    view, (a, _) = view_with_two_slices()
    view.put_usage("n1", fx.usage("n1", 50.0, fx.line(a, used_bytes=7)), received_at=60.0)
    view.put_usage("n1", fx.usage("n1", 40.0, fx.line(a, used_bytes=1)), received_at=61.0)
    assert (
        view.snapshot(now=62.0, usage_ttl_s=30).nodes[0].devices[0].slices[0].usage.used_bytes == 7
    )


def test_a_deleted_ledger_key_frees_every_slice_and_a_deleted_node_disappears() -> None:
    view, _ = view_with_two_slices()
    view.put_ledger("n1", None, 5)
    assert [len(d.slices) for d in view.snapshot(now=0, usage_ttl_s=1).nodes[0].devices] == [0, 0]
    view.put_node("n1", None)
    assert view.snapshot(now=0, usage_ttl_s=1).nodes == ()


def test_an_older_ledger_revision_is_ignored() -> None:
    view, (a, _b) = view_with_two_slices()
    view.put_ledger("n1", fx.ledger("n1", a), 2)
    assert len(view.snapshot(now=0, usage_ttl_s=1).nodes[0].devices[0].slices) == 2


def test_a_slice_on_a_device_the_node_did_not_register_is_still_shown() -> None:
    view = FleetView()
    view.put_ledger("n9", fx.ledger("n9", fx.slice_of("x", "G-unknown", index=3)), 1)
    (node,) = view.snapshot(now=0, usage_ttl_s=1).nodes
    assert not node.registered
    (dev,) = node.devices
    assert (dev.uuid, dev.index, dev.device, len(dev.slices)) == ("G-unknown", 3, None, 1)


def test_a_containers_devices_are_numbered_in_device_index_order() -> None:
    view = FleetView()
    view.put_node("n1", fx.registration("n1", fx.device("G0", 0), fx.device("G1", 1)))
    high = fx.slice_of("p", "G1", index=1)
    low = fx.slice_of("p", "G0", index=0)
    view.put_ledger("n1", fx.ledger("n1", high, low), 1)
    rows = view.snapshot(now=0, usage_ttl_s=1).nodes[0].devices
    assert [(d.uuid, d.slices[0].vdevice_index) for d in rows] == [("G0", 0), ("G1", 1)]


@pytest.mark.parametrize(
    ("source", "key", "value", "needle"),
    [
        ("nodes", "n1", b"{not json", "nodes 'n1'"),
        ("nodes", "n1", fx.registration("n2"), "value names node 'n2'"),
        ("ledger", "n1", b'{"node": "n1", "slices": [{"pod_uid": 1}]}', "ledger 'n1'"),
        ("ledger", "n1", fx.ledger("n3"), "value names node 'n3'"),
        ("usage", "n1", b'{"type": "node-usage"}', "usage 'n1'"),
        ("usage", "n1", fx.usage("n4", 1.0), "report names node 'n4'"),
        (
            "usage",
            "n1",
            fx.usage("n1", 1.0, fx.line(fx.slice_of("a", "G0"), used_bytes=-5)),
            "$.containers[0].used_bytes=-5: Expected `int` >= 0",
        ),
        (
            "usage",
            "n1",
            fx.usage("n1", 1.0, fx.line(fx.slice_of("a", "G0"), used_bytes=1, utilization=140.0)),
            "$.containers[0].utilization_percent=140.0: Expected `float` <= 100",
        ),
        (
            "usage",
            "n1",
            fx.usage(
                "n1",
                1.0,
                devices=(
                    events.DeviceUsage(
                        uuid="G0",
                        index=0,
                        type="T",
                        used_bytes=0,
                        total_bytes=1,
                        memory_utilization_percent=101.0,
                    ),
                ),
            ),
            "$.devices[0].memory_utilization_percent=101.0: Expected `float` <= 100",
        ),
    ],
)
def test_a_malformed_value_is_rejected_naming_its_source_and_key_and_the_view_keeps_its_state(
    source: str, key: str, value: bytes, needle: str
) -> None:
    view, _ = view_with_two_slices()
    before = view.snapshot(now=0, usage_ttl_s=1)
    with pytest.raises(RejectedValue) as err:
        if source == "nodes":
            view.put_node(key, value)
        elif source == "ledger":
            view.put_ledger(key, value, 10)
        else:
            view.put_usage(key, value, received_at=0)
    assert err.value.source == source and needle in str(err.value)
    assert view.snapshot(now=0, usage_ttl_s=1).nodes == before.nodes


def test_stats_of_a_silent_replica_expire() -> None:
    view = FleetView()
    view.put_stats(events.Stats(name="r1", placed=3), received_at=10.0)
    view.put_stats(events.Stats(name="r2", placed=5), received_at=20.0)
    assert [s.name for s in view.live_stats(now=25.0, ttl_s=10)] == ["r2"]


@pytest.mark.parametrize(
    ("memory_mib", "cores", "slices", "healthy", "expected"),
    [
        (0, 0, 0, True, 1000),  # whole and idle
        (4000, 10, 1, True, 750),  # memory is the smaller share
        (1000, 60, 1, True, 400),  # cores are the smaller share
        (16000, 0, 1, True, 0),  # memory full
        (1000, 10, 4, True, 0),  # every split slot taken
        (0, 0, 0, False, 0),  # unhealthy
    ],
)
def test_a_devices_free_share_is_its_smaller_free_share_of_memory_and_cores(
    memory_mib: int, cores: int, slices: int, healthy: bool, expected: int
) -> None:
    dev = Device(uuid="G", index=0, type="T", memory_mib=16000, split_count=4, healthy=healthy)
    got = fragmentation.free_milli(dev, slices=slices, memory_mib=memory_mib, cores=cores)
    assert got == expected


@pytest.mark.parametrize(
    ("shares", "free", "stranded", "ratio"),
    [
        ((), 0, 0, 0.0),
        ((1000, 1000), 2000, 0, 0.0),  # only whole GPUs idle: nothing fragmented
        ((1000, 500), 1500, 500, 100 * 500 / 1500),
        ((250, 750, 0), 1000, 1000, 100.0),  # no idle GPU is whole
    ],
)
def test_fleet_fragmentation_is_the_idle_share_on_partly_used_gpus(
    shares: tuple[int, ...], free: int, stranded: int, ratio: float
) -> None:
    fig = fragmentation.figure(shares)
    assert (fig.free_milli, fig.stranded_milli) == (free, stranded)
    assert fig.ratio_percent == pytest.approx(ratio)


def test_usage_of_a_node_that_never_registered_is_refused_and_nothing_of_it_is_kept() -> None:
    view, (a, _) = view_with_two_slices()
    for n in range(50):
        with pytest.raises(RejectedValue, match="not registered"):
            view.put_usage(f"ghost-{n}", fx.usage(f"ghost-{n}", 1.0), received_at=1.0)
    assert set(view.usage) == set()
    view.put_usage("n1", fx.usage("n1", 1.0, fx.line(a, used_bytes=7)), received_at=1.0)
    assert set(view.usage) == {"n1"}


def test_silent_nodes_and_replicas_are_forgotten_after_the_ttl_and_a_deleted_node_at_once() -> None:
    view, (a, _) = view_with_two_slices()
    view.put_node("n2", fx.registration("n2", fx.device("G9", 0)))
    view.put_usage("n1", fx.usage("n1", 1.0, fx.line(a, used_bytes=7)), received_at=180.0)
    view.put_usage("n2", fx.usage("n2", 1.0), received_at=10.0)
    view.put_stats(events.Stats(name="gone-replica"), received_at=10.0)
    view.put_stats(events.Stats(name="r1"), received_at=180.0)
    assert view.forget_silent(now=200.0, ttl_s=190.0) == []
    assert view.forget_silent(now=200.0, ttl_s=60.0) == ["gone-replica", "n2"]
    assert set(view.usage) == {"n1"} and set(view.stats) == {"r1"}
    view.put_node("n1", None)
    assert view.usage == {}
