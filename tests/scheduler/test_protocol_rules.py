"""The commit protocol's single decisions, as tables: deadlines at the door, what a claim
value says, what a schedule and a release do on finding one. Their interleavings are
``test_protocol.py``."""

from __future__ import annotations

import pytest

from services.scheduler.core import protocol
from services.scheduler.core.protocol import Claim, ClaimKind, Found, Releasing

HELD = Claim(kind=ClaimKind.HELD, token=b"r1 x.0")
RELEASED = Claim(kind=ClaimKind.RELEASED)
REFUSED = Claim(kind=ClaimKind.REFUSED, reason="0/2 nodes fit")


@pytest.mark.parametrize(
    ("client", "deadline"),
    [
        (None, 1010.0),  # none: the default after arrival
        (1003.0, 1003.0),  # the client's own
        (999.0, 999.0),  # already past: kept, the request is dropped
        (5000.0, 1060.0),  # too far ahead: brought forward to the maximum
    ],
)
def test_every_request_is_handled_under_a_bounded_deadline(
    client: float | None, deadline: float
) -> None:
    assert protocol.door_deadline(client, now=1000.0, default_s=10.0, max_s=60.0) == deadline


def test_a_tombstone_lives_longer_than_any_deadline() -> None:
    assert protocol.TOMBSTONE_TTL_S > protocol.MAX_DEADLINE_S >= protocol.DEFAULT_DEADLINE_S


@pytest.mark.parametrize(
    ("deadline", "now", "may"),
    [(None, 5.0, True), (10.0, 9.9, True), (10.0, 10.0, True), (10.0, 10.01, False)],
)
def test_a_request_commits_only_before_its_deadline(
    deadline: float | None, now: float, may: bool
) -> None:
    assert protocol.may_commit(deadline, now=now) is may


@pytest.mark.parametrize(
    ("value", "claim"),
    [
        (b"r0 ab12.7", Claim(kind=ClaimKind.HELD, token=b"r0 ab12.7")),
        (b"node-0", Claim(kind=ClaimKind.HELD, token=b"node-0")),  # older claims: tokens
        (protocol.TOMBSTONE, RELEASED),
        (protocol.refusal("0/2 nodes fit"), REFUSED),
        (b"{not json", RELEASED),  # an unreadable marker places nothing
        (b'{"state": "other"}', RELEASED),
    ],
)
def test_a_claim_value_decodes_to_what_it_says(value: bytes, claim: Claim) -> None:
    assert protocol.decode_claim(value) == claim


def test_a_token_never_reads_as_a_marker_and_a_refusal_keeps_a_bounded_reason() -> None:
    assert protocol.decode_claim(protocol.token("{odd", "1.0")).kind is ClaimKind.HELD
    long = protocol.decode_claim(protocol.refusal("x" * 5000))
    assert long.kind is ClaimKind.REFUSED and len(long.reason) == protocol.MAX_REASON_CHARS


@pytest.mark.parametrize(
    ("claim", "stale", "found"),
    [
        (None, False, Found.CLAIM),
        (Claim(kind=ClaimKind.HELD, token=b"mine"), False, Found.OURS),
        (HELD, False, Found.WAIT),
        (HELD, True, Found.WAIT),
        (RELEASED, False, Found.REFUSE),  # a released UID is refused, header or not
        (RELEASED, True, Found.REFUSE),
        (REFUSED, False, Found.TAKE_OVER),  # a client with a deadline decides afresh
        (REFUSED, True, Found.REFUSE),  # maybe a late copy: the answer is repeated
    ],
)
def test_a_schedule_request_finding_a_claim(claim: Claim | None, stale: bool, found: Found) -> None:
    assert protocol.on_claim(claim, mine=b"mine", stale_copy_possible=stale) is found


@pytest.mark.parametrize(
    ("claim", "placed", "unchanged_s", "step"),
    [
        (None, False, 0.0, Releasing.TOMBSTONE),
        (RELEASED, True, 0.0, Releasing.FREE),  # released before: free what is left
        (REFUSED, False, 0.0, Releasing.TOMBSTONE),
        (HELD, True, 0.0, Releasing.TOMBSTONE),  # placed: at once
        (HELD, False, 1.9, Releasing.WAIT),  # a placement under way
        (HELD, False, 2.0, Releasing.TOMBSTONE),  # stalled or dead: tombstoned all the same
    ],
)
def test_a_release_finding_a_claim(
    claim: Claim | None, placed: bool, unchanged_s: float, step: Releasing
) -> None:
    got = protocol.on_release(claim, placed=placed, unchanged_s=unchanged_s, claim_wait_s=2.0)
    assert got is step


@pytest.mark.parametrize(
    ("elapsed_s", "confirm"), [(0.0, False), (0.99, False), (1.0, True), (30.0, True)]
)
def test_only_a_commit_slower_than_half_the_claim_wait_confirms_its_claim(
    elapsed_s: float, confirm: bool
) -> None:
    assert protocol.must_confirm(elapsed_s=elapsed_s, claim_wait_s=2.0) is confirm


@pytest.mark.parametrize(
    ("reason_kind", "words"), [(REFUSED, "0/2 nodes fit (repeated"), (RELEASED, "was released")]
)
def test_a_refused_request_is_told_why(reason_kind: Claim, words: str) -> None:
    assert words in protocol.refused_reason("p", reason_kind)
