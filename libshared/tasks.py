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
import signal
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

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


class _Interrupted(Exception):
    """Ctrl-C ended the main coroutine of ``run_interruptibly``."""


def run_interruptibly(main: Coroutine[Any, Any, T], *, retry_s: float = RETRY_S) -> T:
    """``asyncio.run(main)`` whose Ctrl-C always ends ``main``: SIGINT cancels it, again
    every ``retry_s`` seconds until it is done (``asyncio.run`` cancels once, and a
    swallowed cancellation let a bus replay run to its end and exit 0), and then raises
    ``KeyboardInterrupt``. Outside the main thread, plain ``asyncio.run``."""

    async def guarded() -> T:
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(main)
        interrupted = asyncio.Event()
        try:
            loop.add_signal_handler(signal.SIGINT, interrupted.set)
        except (RuntimeError, ValueError):  # not the main thread: no signal handlers
            return await task
        waiter = asyncio.ensure_future(interrupted.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if interrupted.is_set():
                await stop(task, retry_s=retry_s)
                raise _Interrupted
            return task.result()
        finally:
            waiter.cancel()
            loop.remove_signal_handler(signal.SIGINT)

    try:
        return asyncio.run(guarded())
    except _Interrupted:
        raise KeyboardInterrupt from None
