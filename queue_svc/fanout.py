"""In-memory fan-out of committed items (run events, replies) to live stream subscribers.

Cheap per item (a deque append and, when the reader waits, one future): it runs for every event of
every watcher. A subscriber that falls too far behind is marked `overflowed` instead of blocking
the writer; its stream then re-reads the gap from the store (which holds everything), so nothing is
lost. `stop()` wakes a waiting reader so a stream can end promptly on shutdown.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Stopped(Exception):
    """The subscription was stopped (the service is shutting down)."""


class Subscription(Generic[T]):
    def __init__(self, fanout: Fanout[T], maxsize: int, accept: Callable[[T], bool] | None = None) -> None:
        self._fanout = fanout
        self._accept = accept
        self._maxsize = maxsize
        self._items: deque[T] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.overflowed = False
        self.stopped = False

    def offer(self, item: T) -> None:
        if self.overflowed or (self._accept is not None and not self._accept(item)):
            return
        if len(self._items) >= self._maxsize:
            self.overflowed = True
            self._items.clear()
        else:
            self._items.append(item)
        self._wake()

    def stop(self) -> None:
        self.stopped = True
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def next(self) -> T | None:
        """The next live item; None when the subscription overflowed (resync from the store);
        raises Stopped once stopped."""
        while True:
            if self.stopped:
                raise Stopped
            if self.overflowed:
                return None
            if self._items:
                return self._items.popleft()
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def close(self) -> None:
        self._fanout._subs.discard(self)


class Fanout(Generic[T]):
    def __init__(self, maxsize: int = 10_000) -> None:
        self._subs: set[Subscription[T]] = set()
        self._maxsize = maxsize

    def subscribe(self, accept: Callable[[T], bool] | None = None) -> Subscription[T]:
        """A subscription; `accept` filters at publish time, so a reader never wakes for items it skips."""
        sub: Subscription[T] = Subscription(self, self._maxsize, accept)
        self._subs.add(sub)
        return sub

    def publish(self, item: T) -> None:
        for sub in self._subs:
            sub.offer(item)

    @property
    def subscribers(self) -> int:
        return len(self._subs)
