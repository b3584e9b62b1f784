"""Whether a reply may be sent again is a typed field of ``BusError``
(``libshared.events.retry_after_of``), never read from the reason's text."""

from __future__ import annotations

import pytest

from libshared import errors, events


@pytest.mark.parametrize(
    ("reply", "want"),
    [
        pytest.param(events.BusError(reason="x", retry_after_s=0.25), 0.25, id="temporary"),
        pytest.param(events.BusError(reason="temporary: says the text"), None, id="text-only"),
        pytest.param(events.BusError(reason="malformed PodRequest"), None, id="permanent"),
        pytest.param(events.Ack(pod_uid="p"), None, id="not-an-error"),
    ],
)
def test_a_reply_may_be_sent_again_only_when_its_error_says_after_how_long(
    reply: events.BusError | events.Ack, want: float | None
) -> None:
    assert events.retry_after_of(events.ENCODER.encode(reply)) == want


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage",
        b'{"type": "error"}',
        b'{"type": "error", "reason": "x", "retry_after_s": -1}',
        b"[" * 10_000,
    ],
    ids=["empty", "garbage", "no-reason", "negative", "deep"],
)
def test_a_reply_that_does_not_decode_is_never_retried(data: bytes) -> None:
    assert events.retry_after_of(data) is None


def test_a_temporary_error_carries_when_to_retry() -> None:
    exc = errors.TemporaryError("ledger unavailable", retry_after_s=1.5)
    assert isinstance(exc, errors.VsliceError) and exc.retry_after_s == 1.5
    assert errors.TemporaryError("x").retry_after_s == errors.RETRY_AFTER_S
