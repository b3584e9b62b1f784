"""``libshared.tasks``: a task that swallows a cancellation (as Python 3.11's
``asyncio.wait_for`` inside nats.py can) is still stopped, and still ended by Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

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


def test_ctrl_c_ends_a_run_whose_main_swallows_its_first_cancellations() -> None:
    swallowed = 0

    async def stubborn() -> str:
        nonlocal swallowed
        # Ctrl-C, once the loop runs: the process's own SIGINT
        asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), signal.SIGINT)
        for _ in range(100):  # 10 s of requests, if nothing ends it
            try:
                await asyncio.sleep(0.1)
            except asyncio.CancelledError:
                if swallowed < 2:  # taken for a failed request: the loop goes on
                    swallowed += 1
                    asyncio.current_task().uncancel()  # type: ignore[union-attr]
                    continue
                raise
        return "finished"  # what asyncio.run let happen: exit 0 after a Ctrl-C

    with pytest.raises(KeyboardInterrupt):
        tasks.run_interruptibly(stubborn(), retry_s=0.05)
    assert swallowed == 2
    # the default Ctrl-C is back once the run is over
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_run_not_interrupted_returns_its_result() -> None:
    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    assert tasks.run_interruptibly(answer()) == 42
