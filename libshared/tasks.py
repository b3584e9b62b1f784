"""Stopping a background task for sure.

Python 3.11's ``asyncio.wait_for``, which nats.py awaits every request and publish
acknowledgement with, can swallow a cancellation that arrives as the awaited answer does
(CPython gh-86296, fixed in 3.12): nats.py then raises its own ``TimeoutError`` or
returns, a loop that carries on after a failed request goes round again, and a plain
``task.cancel(); await task`` waits for ever. Seen in a scheduler replica's upkeep, whose
stop hung on a loaded machine.
"""

from __future__ import annotations

import asyncio

RETRY_S = 0.5  # how long one cancellation is given before it is sent again, seconds


async def stop(task: asyncio.Task[object] | None, *, retry_s: float = RETRY_S) -> None:
    """Cancel ``task`` (None: nothing) and wait until it is done, cancelling it again
    every ``retry_s`` seconds while it is not. Its result or error is dropped. A
    cancellation of the caller is passed on once the task is done."""
    if task is None:
        return
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=retry_s)
    if not task.cancelled():
        task.exception()  # retrieved: no "exception was never retrieved" warning
