"""``libshared.tasks``: a task that swallows a cancellation (as Python 3.11's
``asyncio.wait_for`` inside nats.py can) is still stopped, and still ended by Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from libshared import tasks


class Stubborn:
    """A request loop that takes its first two cancellations for failed requests and goes
    on, as one whose cancellation Python 3.11's ``wait_for`` swallowed does."""

    def __init__(self) -> None:
        self.swallowed = 0

    async def loop(self, rounds: int, pause_s: float) -> str:
        for _ in range(rounds):
            try:
                await asyncio.sleep(pause_s)
            except asyncio.CancelledError:
                if self.swallowed == 2:
                    raise
                self.swallowed += 1
                task = asyncio.current_task()
                assert task is not None
                task.uncancel()
        return "finished"


async def test_a_loop_that_swallows_its_first_cancellations_is_stopped() -> None:
    stubborn = Stubborn()
    task = asyncio.create_task(stubborn.loop(rounds=10, pause_s=3600))
    await asyncio.sleep(0)
    async with asyncio.timeout(20):
        await tasks.stop(task, retry_s=0.05)
    assert task.cancelled() and stubborn.swallowed == 2


async def test_a_finished_or_failed_task_and_none_stop_at_once() -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    failed = asyncio.create_task(fails())
    await asyncio.wait({failed})
    await tasks.stop(failed)  # its error is retrieved, not raised
    await tasks.stop(None)
    assert failed.done() and isinstance(failed.exception(), RuntimeError)


def test_ctrl_c_ends_a_run_whose_main_swallows_its_first_cancellations() -> None:
    stubborn = Stubborn()

    async def interrupted() -> str:
        # Ctrl-C, once the loop runs: the process's own SIGINT
        asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), signal.SIGINT)
        # 10 s of requests if nothing ends them: what asyncio.run let happen (exit 0)
        return await stubborn.loop(rounds=100, pause_s=0.1)

    with pytest.raises(KeyboardInterrupt):
        tasks.run_interruptibly(interrupted(), retry_s=0.05)
    assert stubborn.swallowed == 2
    # the default Ctrl-C is back once the run is over
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_run_not_interrupted_returns_its_result() -> None:
    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    assert tasks.run_interruptibly(answer()) == 42
