"""In-memory fan-out of committed items (run events, replies) to live stream subscribers.

A subscriber that falls too far behind is marked `overflowed` instead of blocking the writer;
its stream then re-reads the gap from the store (which holds everything), so nothing is lost.
"""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

T = TypeVar("T")


class Subscription(Generic[T]):
    def __init__(self, fanout: Fanout[T], maxsize: int) -> None:
        self._fanout = fanout
        self.queue: asyncio.Queue[T] = asyncio.Queue(maxsize)
        self.overflowed = False

    def offer(self, item: T) -> None:
        if self.overflowed:
            return
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.overflowed = True
            # Wake a reader blocked on get(): it must notice the overflow and resync from the store.
            while not self.queue.empty():
                self.queue.get_nowait()
            self._fanout._kick(self)

    def close(self) -> None:
        self._fanout._subs.discard(self)


class Fanout(Generic[T]):
    def __init__(self, maxsize: int = 10_000) -> None:
        self._subs: set[Subscription[T]] = set()
        self._maxsize = maxsize
        self._wakers: dict[Subscription[T], asyncio.Event] = {}

    def subscribe(self) -> Subscription[T]:
        sub: Subscription[T] = Subscription(self, self._maxsize)
        self._subs.add(sub)
        return sub

    def publish(self, item: T) -> None:
        for sub in list(self._subs):
            sub.offer(item)

    def _kick(self, sub: Subscription[T]) -> None:
        ev = self._wakers.get(sub)
        if ev is not None:
            ev.set()

    async def next(self, sub: Subscription[T]) -> T | None:
        """The next live item, or None when the subscription overflowed (resync from the store)."""
        if sub.overflowed:
            return None
        if not sub.queue.empty():
            return sub.queue.get_nowait()
        ev = asyncio.Event()
        self._wakers[sub] = ev
        getter = asyncio.ensure_future(sub.queue.get())
        waker = asyncio.ensure_future(ev.wait())
        try:
            done, _ = await asyncio.wait({getter, waker}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                return getter.result()
            return None
        finally:
            self._wakers.pop(sub, None)
            for t in (getter, waker):
                if not t.done():
                    t.cancel()

    @property
    def subscribers(self) -> int:
        return len(self._subs)
