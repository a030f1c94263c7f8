"""Live streams when several run-control replicas share one PostgreSQL (store_pg.py).

Every replica commits events and replies under database-wide numbers, in the order of those numbers
(store_pg.TAKE_NUMBERS). A client's WatchRunEvents or StreamReplies may reach any replica, so each
replica runs one `Tailer`: it reads what was committed after the last number it published, in order,
and publishes it to the replica's fan-outs (fanout.py), which feed the streams exactly as before.
It is woken by this replica's own commits (at once) and by the others' through LISTEN/NOTIFY
(`flynn_queue`, sent at their COMMIT); a notification is a wake-up only: the tables are the truth,
and a poll every `poll_seconds` covers a notification lost while the listener reconnected.

A fan-out nobody subscribes to costs nothing per commit of the others: a wake-up reads only what a
stream is listening to (events, replies, or neither), and the numbers of an unwatched fan-out are moved
to the head by the poll alone (one query for both). A subscriber never needs the tailer's number to be
current: it reads its backlog from the store itself (servicer.replay_then_live) and drops what it gets
twice; a `from_now` stream asks the database for the head (RunControl.events_head). On 2 cores shared
by 3 replicas this took the tailers of the replicas without streams from four queries per commit of
any other replica to one query a second (docs/operations/SCALING.md, "Cancels with several replicas").
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import psycopg
from flynn.v1 import run_control_pb2 as pb

from queue_svc.fanout import Fanout
from queue_svc.store import PAGE
from queue_svc.store_pg import CHANNEL, PgQueueStore

log = logging.getLogger(__name__)


class Tailer:
    def __init__(
        self,
        store: PgQueueStore,
        events: Fanout[pb.RunEvent],
        replies: Fanout[pb.Reply],
        poll_seconds: float = 1.0,
    ) -> None:
        self.store = store
        self.events = events
        self.replies = replies
        self.poll_seconds = poll_seconds
        self.last_seq = 0
        self.last_cursor = 0
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._listener: psycopg.AsyncConnection[tuple[Any, ...]] | None = None
        #: Told the highest (event, cursor) numbers published so far.
        self.progress: Callable[[int, int], None] = lambda seq, cursor: None

    async def start(self) -> None:
        self.last_seq, self.last_cursor = await self.store.heads()
        self.progress(self.last_seq, self.last_cursor)
        self._tasks = [asyncio.ensure_future(self._listen()), asyncio.ensure_future(self._tail())]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._listener is not None:
            await self._listener.close()

    def wake(self) -> None:
        self._wake.set()

    def publish_own(self, events: list[pb.RunEvent], replies: list[pb.Reply]) -> None:
        """This replica's batch just committed: publish it at once when it directly follows what was
        published (nothing of another replica's in between: the usual case, and always with one
        replica); otherwise read it, in order, from the database. Either way nothing is published
        twice or out of order."""
        if events and not self.events.subscribers:
            self.last_seq = max(self.last_seq, events[-1].global_seq)  # see _catch_up
            events = []
        if replies and not self.replies.subscribers:
            self.last_cursor = max(self.last_cursor, replies[-1].cursor)
            replies = []
        if events and events[0].global_seq == self.last_seq + 1:
            for ev in events:
                self.events.publish(ev)
            self.last_seq = events[-1].global_seq
            events = []
        if replies and replies[0].cursor == self.last_cursor + 1:
            for r in replies:
                self.replies.publish(r)
            self.last_cursor = replies[-1].cursor
            replies = []
        self.progress(self.last_seq, self.last_cursor)
        if events or replies:
            self._wake.set()

    async def _listen(self) -> None:
        delay = 0.1
        while True:
            try:
                conninfo = self.store._conninfo("flynn-queue-listener")
                self._listener = await psycopg.AsyncConnection.connect(conninfo, autocommit=True)
                await self._listener.execute(f"LISTEN {CHANNEL}")
                delay = 0.1
                self.wake()  # anything committed while we were not listening
                async for note in self._listener.notifies():
                    # Our own commits are handed over directly; streams nobody here watches wait for the poll.
                    if note.payload != self.store.writer_id and (
                        self.events.subscribers or self.replies.subscribers
                    ):
                        self.wake()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("run-control listener lost; reconnecting", extra={"error": str(e)})
            finally:
                if self._listener is not None:
                    await self._listener.close()
                    self._listener = None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _tail(self) -> None:
        loop = asyncio.get_running_loop()
        next_poll = loop.time() + self.poll_seconds
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), max(next_poll - loop.time(), 0.0))
            except TimeoutError:
                pass
            self._wake.clear()
            polled = loop.time() >= next_poll
            if polled:
                next_poll = loop.time() + self.poll_seconds
            elif not self.events.subscribers and not self.replies.subscribers:
                continue  # a wake-up for streams nobody here watches: the poll moves the numbers
            try:
                await self._catch_up(polled)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("run-control tailer read failed; retrying", extra={"error": str(e)})
                await asyncio.sleep(0.2)
                self._wake.set()

    async def _catch_up(self, polled: bool = True) -> None:
        """Publish what was committed after the last numbers published, for the fan-outs someone
        subscribes to. A fan-out nobody subscribes to only moves its number to the head, on the poll
        (one query for both): a subscriber that arrives later reads its backlog from the store itself
        (servicer.replay_then_live), and it subscribes before that read, so checking for subscribers
        AFTER the head was read never skips an item it needs; what it then gets from here twice (the
        number may be up to a poll behind) it drops by number."""
        if polled and not (self.events.subscribers and self.replies.subscribers):
            g_head, c_head = await self.store.heads()
            if not self.events.subscribers:
                self.last_seq = max(self.last_seq, g_head)
            if not self.replies.subscribers:
                self.last_cursor = max(self.last_cursor, c_head)
        while self.events.subscribers:
            rows = await self.store.events_after(self.last_seq)
            for data in rows:
                ev = pb.RunEvent.FromString(data)
                if ev.global_seq <= self.last_seq:
                    continue  # published meanwhile by publish_own
                self.last_seq = ev.global_seq
                self.events.publish(ev)
            if len(rows) < PAGE:
                break
        while self.replies.subscribers:
            replies = await self.store.replies_after(self.last_cursor)
            for data in replies:
                reply = pb.Reply.FromString(data)
                if reply.cursor <= self.last_cursor:
                    continue
                self.last_cursor = reply.cursor
                self.replies.publish(reply)
            if len(replies) < PAGE:
                break
        self.progress(self.last_seq, self.last_cursor)
