"""What a sender uses to keep within the bounds: ``clip`` cuts a text for people,
``violation`` names what a value would be refused for."""

from __future__ import annotations

from libshared import bounds, events


def test_clip_keeps_a_short_text_and_cuts_a_long_one_saying_so() -> None:
    assert bounds.clip("short") == "short"
    cut = bounds.clip("x" * (bounds.MAX_TEXT + 1))
    assert len(cut) == bounds.MAX_TEXT and cut.endswith("...")
    assert bounds.clip("abcdef", 5) == "ab..."


def test_violation_names_the_field_a_receiver_would_refuse() -> None:
    ok = events.Failed(pod_uid="p", node="n1", reason="no space")
    assert bounds.violation(ok, events.Failed) == ""
    long = events.Failed(pod_uid="p", node="n1", reason="x" * (bounds.MAX_TEXT + 1))
    assert bounds.violation(long, events.Failed).startswith("$.reason=")
    clipped = events.Failed(pod_uid="p", node="n1", reason=bounds.clip(long.reason))
    assert bounds.violation(clipped, events.Failed) == ""
