"""Wake-ups from PostgreSQL LISTEN/NOTIFY, on a connection of their own, plus a periodic safety poll.

    listener = Listener(db, channels=("flynn_config_revision",), on_wake=follower.wake, poll_seconds=1.0)
    listener.start()            # a task: connect, LISTEN, call on_wake() per notification and per poll
    await listener.stop()

A notification is only ever a *hint* that something changed: the callback re-reads the table that
is the truth from where it stopped. So a lost notification (the listening connection broke, the
database restarted) costs at most one poll interval, never a gap, and a notification's payload is
never trusted. `on_wake` is also called after every (re)connect, because notifications sent while
the connection was down are lost.

The connection is not from the pool (a LISTENing connection must stay checked out for as long as it
listens); it reconnects with jittered backoff after any failure. `Follower` is the usual `on_wake`:
a task that re-reads the table after each wake-up (config_svc/revision_feed.py,
config_svc/principal_cache.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence

import psycopg
from psycopg import sql

from flynn_runtime.backoff import Backoff
from flynn_runtime.database import Database
from flynn_runtime.errors import FlynnError
from flynn_runtime.tasks import cancel_and_wait

log = logging.getLogger(__name__)


class Listener:
    def __init__(
        self,
        db: Database,
        channels: Sequence[str],
        on_wake: Callable[[], None],
        poll_seconds: float = 1.0,
    ) -> None:
        if not channels:
            raise ValueError("Listener needs at least one channel")
        if poll_seconds <= 0:
            raise ValueError("poll_seconds must be positive")
        self.db = db
        self.channels = tuple(channels)
        self.on_wake = on_wake
        self.poll_seconds = poll_seconds
        self.notifications = 0
        self.reconnects = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"listen:{','.join(self.channels)}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _run(self) -> None:
        backoff = Backoff(0.1, 2.0)
        conninfo = Database.conninfo(
            self.db.settings, self.db.schema, self.db.timeouts, f"flynn-listen-{self.db.schema}"
        )
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(conninfo, autocommit=True)
            except psycopg.Error as e:
                log.warning("LISTEN connection failed, polling meanwhile", extra={"error": str(e)[:200]})
                self.on_wake()
                await asyncio.sleep(min(backoff.next_delay(), self.poll_seconds))
                continue
            try:
                for ch in self.channels:
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(ch)))
                backoff.reset()
                self.on_wake()  # anything committed while we were not listening
                while True:
                    async for _ in conn.notifies(timeout=self.poll_seconds):
                        self.notifications += 1
                        self.on_wake()
                    self.on_wake()  # the safety poll: a quiet interval passed
            except psycopg.Error as e:
                self.reconnects += 1
                log.warning("LISTEN connection lost; reconnecting", extra={"error": str(e)[:200]})
                self.on_wake()
                await asyncio.sleep(backoff.next_delay())
            finally:
                with contextlib.suppress(Exception):
                    await conn.close()


class Follower:
    """The other half of a Listener: runs `catch_up` (re-read the table from where it stopped) after
    wake-ups, one run at a time. Wake-ups that arrive during a run are folded into one more run; a
    FlynnError (the database is down) is logged and retried after `retry_seconds`.

        follower = Follower("config-revision-feed", feed.catch_up)
        follower.start()
        Listener(db, channels, follower.wake, poll_seconds).start()
    """

    def __init__(
        self, name: str, catch_up: Callable[[], Awaitable[object]], retry_seconds: float = 0.5
    ) -> None:
        self.name = name
        self.catch_up = catch_up
        self.retry_seconds = retry_seconds
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.catch_up()
            except FlynnError as e:  # the database is down: retry (the next wake-up or poll would too)
                log.warning("cannot catch up", extra={"follower": self.name, "error": e.message[:200]})
                await asyncio.sleep(self.retry_seconds)
                self._wake.set()
