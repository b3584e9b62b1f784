"""What a bucket message's headers say of its key (libshared.watching.is_removal)."""

from __future__ import annotations

import pytest

from libshared import watching


@pytest.mark.parametrize(
    ("headers", "removal"),
    [
        (None, False),
        ({}, False),
        ({"Nats-Msg-Id": "x"}, False),
        ({"KV-Operation": "DEL"}, True),
        ({"KV-Operation": "PURGE"}, True),
        ({"KV-Operation": "PUT"}, False),
        ({"Nats-Marker-Reason": "MaxAge"}, True),
        ({"Nats-Marker-Reason": "Remove"}, True),
    ],
)
def test_a_delete_a_purge_or_a_server_marker_removes_the_key(
    headers: dict[str, str] | None, removal: bool
) -> None:
    assert watching.is_removal(headers) is removal
