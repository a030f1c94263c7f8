"""Fan-out of committed revisions to every open watch: one shared log, one wake-up per revision.

A revision is serialized once (by the servicer) and appended to the hub's log of recent revisions;
`publish` then wakes every waiting watch with one pass over their wake-up futures. Each watch keeps
only its position (the last revision it sent) and, when woken, takes what follows it from the shared
log: no per-watch queue, no per-watch copy, no per-watch timer. Bookmarks come from one hub-wide
tick every `bookmark_seconds`: a watch woken by the tick with nothing new sends a bookmark.

A watch more than `queue_size` revisions behind the head when it wakes (its reader stopped reading,
so its writes were held back by flow control) is marked overflowed; the servicer closes its stream
with a "reconnect" status, so one slow reader never holds the others back or pins memory.
"""

from __future__ import annotations

import asyncio
import contextlib


class Subscription:
    def __init__(self, hub: WatchHub) -> None:
        self.hub = hub
        self.overflowed = False

    @property
    def closed(self) -> bool:
        return self.hub.closed

    async def next_batch(self, last: int) -> list[tuple[int, bytes]] | None:
        """The revisions after `last` (in order, from the shared log), waiting for one if there is none.

        None when the bookmark tick (or shutdown) woke us with nothing new. [] with `overflowed` set
        when the watch is too far behind. A revision missing from the log (older than the log keeps)
        is simply absent: the caller fills such a gap from storage.
        """
        hub = self.hub
        if hub.head <= last and not hub.closed:
            await hub.wake_up()
            if hub.head <= last or hub.closed:
                return None
        if hub.head - last > hub.queue_size:
            self.overflowed = True
            return []
        return hub.since(last)


class WatchHub:
    def __init__(
        self, queue_size: int = 256, replay_cache: int = 512, bookmark_seconds: float = 15.0
    ) -> None:
        self.queue_size = queue_size
        self.replay_cache = max(replay_cache, queue_size)
        self.bookmark_seconds = bookmark_seconds
        self.head = 0
        self.closed = False
        self._subs: set[Subscription] = set()
        self._recent: dict[int, bytes] = {}
        self._waiters: list[asyncio.Future[None]] = []
        self._ticker: asyncio.Task[None] | None = None

    @property
    def watchers(self) -> int:
        return len(self._subs)

    def subscribe(self) -> Subscription:
        sub = Subscription(self)
        self._subs.add(sub)
        if self._ticker is None and not self.closed:
            self._ticker = asyncio.get_running_loop().create_task(self._tick(), name="config-watch-bookmarks")
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)

    async def wake_up(self) -> None:
        """Wait for the next publish, bookmark tick or close (a future of our own: cancelling one watch
        never touches another's)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        await fut

    def _wake_all(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():  # a cancelled watch left its future behind
                fut.set_result(None)

    def publish(self, revision: int, change_payload: bytes) -> None:
        """Append revision `revision` (its serialized CHANGE message) to the log and wake every watch."""
        self.head = max(self.head, revision)
        self._recent[revision] = change_payload
        while len(self._recent) > self.replay_cache:
            self._recent.pop(min(self._recent))  # the oldest revision (replays may log out of order)
        self._wake_all()

    def since(self, last: int) -> list[tuple[int, bytes]]:
        """The logged revisions in (last, head], in order (those no longer logged are left out)."""
        recent = self._recent
        if self.head == last + 1:  # the common case: exactly one new revision
            payload = recent.get(self.head)
            return [(self.head, payload)] if payload is not None else []
        return [(r, p) for r in range(last + 1, self.head + 1) if (p := recent.get(r)) is not None]

    def cached(self, revision: int) -> bytes | None:
        return self._recent.get(revision)

    def remember(self, revision: int, change_payload: bytes) -> None:
        if revision not in self._recent and len(self._recent) < self.replay_cache:
            self._recent[revision] = change_payload

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.bookmark_seconds)
            self._wake_all()

    def close(self) -> None:
        """Shutdown: every open watch ends (and is told to reconnect)."""
        self.closed = True
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        self._wake_all()

    async def aclose(self) -> None:
        ticker = self._ticker
        self.close()
        if ticker is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
