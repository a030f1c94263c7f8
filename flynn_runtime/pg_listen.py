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
listens); it reconnects with jittered backoff after any failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

import psycopg
from psycopg import sql

from flynn_runtime.backoff import Backoff
from flynn_runtime.database import Database

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
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        backoff = Backoff(0.1, 2.0)
        kwargs = Database.connect_kwargs(
            self.db.settings, self.db.schema, self.db.timeouts, f"flynn-listen-{self.db.schema}"
        )
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(autocommit=True, **kwargs)  # type: ignore[arg-type]
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
