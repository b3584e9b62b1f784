"""The node agent's ledger check before preparing a slice: retried, and an unreadable
ledger counts as holding the pod."""

from __future__ import annotations

import logging
from typing import Any

import nats.errors
import pytest

from libshared.ledgers import NodeLedger, Slice
from libshared.subjects import Subjects
from services.nodeagent.adapters.bus import Agent

NODE = "node-0"
LEDGER = NodeLedger(
    node=NODE,
    slices=(
        Slice(
            pod_uid="held",
            namespace="ml",
            pod="p",
            container="main",
            container_index=0,
            uuid="GPU-a",
            device_index=0,
            memory_mib=1000,
            cores_percent=10,
        ),
    ),
)


def agent(reads: list[NodeLedger | Exception | None]) -> tuple[Agent, list[str]]:
    """An agent whose ledger reads answer ``reads`` in turn (an exception is raised)."""
    unused: Any = None
    one = Agent(nc=unused, js=unused, bus=unused, subjects=Subjects(), name="a", nodes=[])
    asked: list[str] = []

    async def ledger_of(node: str) -> NodeLedger | None:
        asked.append(node)
        answer = reads.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    one.ledger_of = ledger_of  # type: ignore[method-assign]
    return one, asked


@pytest.mark.parametrize(
    ("reads", "pod", "held", "attempts"),
    [
        ([LEDGER], "held", True, 1),
        ([LEDGER], "other", False, 1),
        ([None], "held", False, 1),
        ([nats.errors.TimeoutError(), LEDGER], "other", False, 2),
        ([TimeoutError(), nats.errors.NoRespondersError(), LEDGER], "held", True, 3),
        ([TimeoutError(), TimeoutError(), TimeoutError()], "other", True, 3),
    ],
    ids=["held", "not held", "empty", "one failure", "two failures", "unreadable"],
)
async def test_a_failed_read_is_retried_and_an_unreadable_ledger_counts_as_holding(
    reads: list[NodeLedger | Exception | None],
    pod: str,
    held: bool,
    attempts: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="vslice")
    one, asked = agent(list(reads))
    assert await one._held(NODE, pod) is held
    assert asked == [NODE] * attempts
    warned = [r for r in caplog.records if r.getMessage() == "ledger unreadable"]
    assert len(warned) == sum(isinstance(r, Exception) for r in reads)
