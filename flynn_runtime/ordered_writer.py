"""Store writes applied one at a time, in the order synchronous domain code issued them.

Domain code that runs synchronously on the event loop (the node registry) cannot await a database
round trip in the middle of its bookkeeping. It submits the write instead: `submit` returns a future
the caller may await when the write is a promise (an issued token), or leave when it is not (a
last_seen flush); either way writes reach the store in submission order, so a later write never
overtakes an earlier one. A write that fails is logged and, when awaited, raised to its caller.
The queue is bounded: past `max_pending` a fire-and-forget write is dropped with a warning instead
of growing memory while the database is down.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from flynn_runtime.tasks import cancel_and_wait

log = logging.getLogger(__name__)

T = TypeVar("T")


class OrderedWriter:
    def __init__(self, name: str, max_pending: int = 10_000) -> None:
        self.name = name
        self.max_pending = max_pending
        self._queue: asyncio.Queue[tuple[Callable[[], Awaitable[Any]], asyncio.Future[Any], bool]] = (
            asyncio.Queue()
        )
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"writer-{self.name}")

    def submit(self, write: Callable[[], Awaitable[T]], *, awaited: bool = False) -> asyncio.Future[T]:
        """Queue `write` behind every earlier one. `awaited=False` marks a write nobody waits for."""
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        if not awaited and self._queue.qsize() >= self.max_pending:
            self.dropped += 1
            log.warning("write queue full; dropping a background write", extra={"writer": self.name})
            fut.set_result(None)  # type: ignore[arg-type]
            return fut
        self.start()
        self._queue.put_nowait((write, fut, awaited))
        return fut

    async def drain(self) -> None:
        """Wait until every write submitted so far has been applied (or failed)."""
        if self._task is None:
            return
        await self._queue.join()

    async def close(self) -> None:
        await self.drain()
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _run(self) -> None:
        while True:
            write, fut, awaited = await self._queue.get()
            try:
                result = await write()
            except Exception as e:
                if not awaited:
                    log.warning("background write failed", extra={"writer": self.name, "error": str(e)})
                if not fut.done():
                    fut.set_exception(e) if awaited else fut.set_result(None)
            else:
                if not fut.done():
                    fut.set_result(result)
            finally:
                self._queue.task_done()
