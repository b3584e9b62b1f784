"""Scheduling Events as HAMi words them, and the rate limit that folds a retried pod's
repeats into one Event's count (``services.scheduler.core.recording``)."""

from __future__ import annotations

import pytest

from services.scheduler.core import recording
from services.scheduler.core.recording import Create, Note, Patch, PodRef, Recorder

POD = PodRef(uid="u1", namespace="ml", name="train")
FAILED = Note("Warning", "FilteringFailed", "no available node, 3 nodes do not meet")


@pytest.mark.parametrize(
    ("text", "reasons"),
    [
        ("2/2 CardInsufficientMemory", {"CardInsufficientMemory": 2}),
        (
            "1/4 CardInsufficientCore, 3/4 CardInsufficientMemory",
            {"CardInsufficientCore": 1, "CardInsufficientMemory": 3},
        ),
        ("unknown node", {}),
        ("0/3 nodes fit: 3 no fitting GPU", {}),
        ("UndecodableAllocation: pod a/b on this node ...", {}),
        ("1/1 NodeInsufficientDevice, junk", {"NodeInsufficientDevice": 1}),
    ],
)
def test_reasons_are_read_from_the_counted_parts_as_hamis_parse_reason_reads_them(
    text: str, reasons: dict[str, int]
) -> None:
    assert recording.parse_reason(text) == reasons


def test_filtering_failed_counts_the_nodes_of_each_reason_and_says_how_many_did_not_meet() -> None:
    notes = recording.filtering_failed(
        {
            "gpu-node-b": "2/2 CardUuidMismatch",
            "gpu-node-a": "1/2 CardInsufficientMemory, 1/2 CardUuidMismatch",
            "gpu-node-c": "unknown node",
        },
        candidates=3,
    )
    assert [(n.type, n.reason, n.message) for n in notes] == [
        ("Warning", "FilteringFailed", "1 nodes CardInsufficientMemory(gpu-node-a)"),
        ("Warning", "FilteringFailed", "2 nodes CardUuidMismatch(gpu-node-a,gpu-node-b)"),
        ("Warning", "FilteringFailed", "no available node, 3 nodes do not meet"),
    ]


@pytest.mark.parametrize(
    ("chosen", "candidates", "scores", "message"),
    [
        ("n1", 1, {"n1": 3.0}, "find fit node(n1), 0 nodes not fit, 1 nodes fit(n1:3.00)"),
        (
            "n2",
            3,
            {"n1": 1.5, "n2": 12.25},
            "find fit node(n2), 1 nodes not fit, 2 nodes fit(n1:1.50,n2:12.25)",
        ),
        (
            "a",
            2,
            {"a": 2.0, "b": 2.0},
            "find fit node(a), 0 nodes not fit, 2 nodes fit(b:2.00,a:2.00)",
        ),
    ],
)
def test_filtering_succeed_lists_the_fitting_nodes_by_ascending_score_as_hami(
    chosen: str, candidates: int, scores: dict[str, float], message: str
) -> None:
    note = recording.filtering_succeed(chosen, candidates=candidates, scores=scores)
    assert (note.type, note.reason, note.message) == ("Normal", "FilteringSucceed", message)


def test_binding_notes_have_hamis_reasons_and_shapes() -> None:
    ok = recording.binding_succeed("gpu-node-a", POD)
    assert (ok.type, ok.reason, ok.message) == (
        "Normal",
        "BindingSucceed",
        "Successfully binding node [gpu-node-a] to ml/train",
    )
    bad = recording.binding_failed("pod ml/train does not fit node gpu-node-a")
    assert (bad.type, bad.reason) == ("Warning", "BindingFailed")


def test_a_repeat_within_the_interval_is_counted_not_written() -> None:
    r = Recorder(interval_s=30)
    (created,) = r.observe(POD, [FAILED], now=100.0)
    assert isinstance(created, Create) and created.note == FAILED
    for t in range(101, 130):
        assert r.observe(POD, [FAILED], now=float(t)) == []
    (patch,) = r.observe(POD, [FAILED], now=130.0)
    assert patch == Patch(namespace="ml", name=created.name, count=31, last_s=130.0)


def test_a_pod_retried_every_second_for_ten_minutes_costs_one_create_and_a_write_per_interval() -> (
    None
):
    r = Recorder(interval_s=30)
    actions = []
    for t in range(600):
        actions += r.observe(POD, [FAILED], now=1000.0 + t)
    actions += r.flush(now=1000.0 + 600 + 30)
    creates = [a for a in actions if isinstance(a, Create)]
    patches = [a for a in actions if isinstance(a, Patch)]
    assert len(creates) == 1
    assert len(patches) == 20  # 599 repeats, written every 30 s, the rest by the flush
    assert patches[-1].count == 600
    assert [p.count for p in patches] == sorted(p.count for p in patches)


def test_flush_writes_a_count_left_pending_once_the_interval_passed() -> None:
    r = Recorder(interval_s=10)
    (created,) = r.observe(POD, [FAILED], now=0.0)
    r.observe(POD, [FAILED], now=1.0)
    r.observe(POD, [FAILED], now=2.0)
    assert r.flush(now=5.0) == []
    assert r.flush(now=10.0) == [Patch(namespace="ml", name=created.name, count=3, last_s=2.0)]
    assert r.flush(now=30.0) == []  # nothing pending any more


def test_each_message_is_its_own_event_and_new_messages_are_limited_per_pod_and_reason() -> None:
    r = Recorder(interval_s=10, burst=3)
    notes = [Note("Warning", "FilteringFailed", f"{i} nodes CardTypeMismatch(x)") for i in range(5)]
    actions = r.observe(POD, notes, now=0.0)
    assert [a.note.message for a in actions if isinstance(a, Create)] == [
        n.message for n in notes[:3]
    ]
    assert r.stats.dropped == 2
    # another pod, or another reason, has its own allowance; the window moves on
    other = PodRef(uid="u2", namespace="ml", name="eval")
    assert len(r.observe(other, notes[:1], now=1.0)) == 1
    assert len(r.observe(POD, [recording.binding_failed("x")], now=1.0)) == 1
    assert len(r.observe(POD, notes[3:4], now=11.0)) == 1


def test_a_series_idle_past_its_ttl_or_lost_by_the_api_starts_a_new_event() -> None:
    r = Recorder(interval_s=10, ttl_s=60)
    (first,) = r.observe(POD, [FAILED], now=0.0)
    (again,) = r.observe(POD, [FAILED], now=61.0)
    assert isinstance(again, Create) and again.name != first.name
    r.lost(again)
    (third,) = r.observe(POD, [FAILED], now=62.0)
    assert isinstance(third, Create)
    r.forget(POD.uid)
    assert isinstance(r.observe(POD, [FAILED], now=63.0)[0], Create)


def test_the_recorder_keeps_at_most_max_series() -> None:
    r = Recorder(max_series=10, burst=1000)
    for i in range(50):
        r.observe(PodRef(uid=f"u{i}", namespace="ml", name=f"p{i}"), [FAILED], now=float(i))
    assert r.series == 10
