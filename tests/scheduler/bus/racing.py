"""Quota buckets that make replicas race, or count their reads: for the tests of
namespace quotas."""

from __future__ import annotations

import asyncio
from typing import Any

from nats.js.kv import KeyValue


class RacingKV:
    """A quota bucket whose first read on each of ``parties`` replicas waits until every
    one of them has read: all of them then decide on the same revision, and all but one
    lose the compare-and-set."""

    def __init__(self, kv: KeyValue, barrier: asyncio.Barrier) -> None:
        self._kv, self._barrier, self._first = kv, barrier, True

    async def get(self, key: str) -> Any:
        entry = await self._kv.get(key)
        if self._first:
            self._first = False
            async with asyncio.timeout(30):
                await self._barrier.wait()
        return entry

    def __getattr__(self, name: str) -> Any:
        return getattr(self._kv, name)


class CountingKV:
    """A bucket that counts its reads."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv, self.gets = kv, 0

    async def get(self, key: str) -> Any:
        self.gets += 1
        return await self._kv.get(key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._kv, name)


class UnreadableKV:
    """A quota bucket whose reads time out (a NATS node failing over)."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    async def get(self, key: str) -> Any:
        raise TimeoutError(f"reading {key} timed out")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._kv, name)
