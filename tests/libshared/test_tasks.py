"""``libshared.tasks.stop``: a task that swallows a cancellation (as Python 3.11's
``asyncio.wait_for`` inside nats.py can) is still stopped."""

from __future__ import annotations

import asyncio

from libshared import tasks


async def test_a_loop_that_swallows_its_first_cancellations_is_stopped() -> None:
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if swallowed < 2:  # taken for a failed request: the loop goes on
                    swallowed += 1
                    asyncio.current_task().uncancel()  # type: ignore[union-attr]
                    continue
                raise

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    async with asyncio.timeout(20):
        await tasks.stop(task, retry_s=0.05)
    assert task.cancelled() and swallowed == 2


async def test_a_finished_or_failed_task_and_none_stop_at_once() -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    failed = asyncio.create_task(fails())
    await asyncio.wait({failed})
    await tasks.stop(failed)  # its error is retrieved, not raised
    await tasks.stop(None)
    assert failed.done() and isinstance(failed.exception(), RuntimeError)
