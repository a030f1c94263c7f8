"""Fan-out of committed revisions to every open watch, each message serialized once.

Every watch owns a bounded queue. Publishing appends the shared, already-serialized message to each
queue (no copy, no per-watcher serialization); a watch whose queue is full is marked overflowed and
its stream is closed with a "reconnect" status, so one slow reader never holds the others back.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque


class Subscription:
    def __init__(self, maxlen: int) -> None:
        self.maxlen = maxlen
        self.items: deque[tuple[int, bytes]] = deque()
        self.event = asyncio.Event()
        self.overflowed = False
        self.closed = False

    def offer(self, revision: int, payload: bytes) -> None:
        if len(self.items) >= self.maxlen:
            self.overflowed = True
        else:
            self.items.append((revision, payload))
        self.event.set()

    def close(self) -> None:
        self.closed = True
        self.event.set()

    async def next_batch(self, timeout: float) -> list[tuple[int, bytes]] | None:  # noqa: ASYNC109
        """Queued messages in order; None when `timeout` passed without any (time for a bookmark)."""
        if not self.items and not (self.closed or self.overflowed):
            try:
                async with asyncio.timeout(timeout):  # no extra task per wait, unlike wait_for
                    await self.event.wait()
            except TimeoutError:
                return None
        self.event.clear()
        batch = list(self.items)
        self.items.clear()
        return batch


class WatchHub:
    def __init__(self, queue_size: int = 256, replay_cache: int = 512) -> None:
        self.queue_size = queue_size
        self.replay_cache = replay_cache
        self.head = 0
        self._subs: set[Subscription] = set()
        self._recent: OrderedDict[int, bytes] = OrderedDict()
        self.closed = False

    @property
    def watchers(self) -> int:
        return len(self._subs)

    def subscribe(self) -> Subscription:
        sub = Subscription(self.queue_size)
        if self.closed:
            sub.close()
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)

    def publish(self, revision: int, change_payload: bytes) -> int:
        """Hand revision `revision` (serialized CHANGE message) to every watch; returns how many overflowed."""
        self.head = max(self.head, revision)
        self._recent[revision] = change_payload
        while len(self._recent) > self.replay_cache:
            self._recent.popitem(last=False)
        overflowed = 0
        for sub in self._subs:
            was = sub.overflowed
            sub.offer(revision, change_payload)
            overflowed += int(sub.overflowed and not was)
        return overflowed

    def cached(self, revision: int) -> bytes | None:
        return self._recent.get(revision)

    def remember(self, revision: int, change_payload: bytes) -> None:
        if revision not in self._recent and len(self._recent) < self.replay_cache:
            self._recent[revision] = change_payload

    def close(self) -> None:
        """Shutdown: every open watch ends (and is told to reconnect)."""
        self.closed = True
        for sub in self._subs:
            sub.close()
