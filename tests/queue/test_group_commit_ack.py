"""Group commit's acknowledgements (queue_svc/group_commit.py) on the real SQLite store: callers of a
batch are woken in the loop callback that learns of the commit, each through a future of its own.

- the callback runs before the flushing coroutine resumes, and only after the transaction is on disk
  (a second connection reads the rows);
- a caller that gives up (its task is cancelled) takes nothing from the others;
- a caller that asks after the commit was acknowledged but before the flush task resumed is not left
  waiting on a batch whose waiters were already woken;
- lazy operations (streamed output chunks) linger up to LINGER_SECONDS for company, so a stream of them
  costs one commit per linger; an operation somebody waits for, or `durable()`, commits at once.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from flynn.v1 import run_control_pb2 as pb

from queue_svc import group_commit
from queue_svc.fanout import Fanout
from queue_svc.group_commit import GroupCommit
from queue_svc.store import RunRow, SessionRow
from queue_svc.store_sqlite import SqliteQueueStore

pytestmark = pytest.mark.backends("sqlite")  # the batching logic; both stores share `in_thread`


class _Session:
    def __init__(self, key: str) -> None:
        self.key = key

    def row(self) -> SessionRow:
        return SessionRow(self.key, "t")


class SlowResumeStore(SqliteQueueStore):
    """The real store, with a pause between the commit being known and `flush()` returning: the window
    in which acknowledged callers run before the flush task resumes."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.resume_delay = 0.0
        self.order: list[str] = []

    async def flush(self, on_durable: object = None) -> None:  # type: ignore[override]
        def durable() -> None:
            self.order.append("on_durable")
            assert callable(on_durable)
            on_durable()

        await super().flush(durable if on_durable is not None else None)
        self.order.append("flush returned")
        await asyncio.sleep(self.resume_delay)


def _commit(store: SqliteQueueStore) -> GroupCommit:
    return GroupCommit(store, Fanout[pb.RunEvent](), Fanout[pb.Reply]())


def _write(gc: GroupCommit, key: str, lazy: bool = False) -> None:
    with gc.op(lazy) as op:
        op.sessions[key] = _Session(key)


def _on_disk(path: Path, key: str) -> bool:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT 1 FROM sessions WHERE session_key = ?", (key,)).fetchone() is not None
    finally:
        db.close()


async def test_callers_are_woken_by_the_commit_callback_after_the_commit(tmp_path: Path) -> None:
    store = SlowResumeStore(tmp_path)
    gc = _commit(store)
    woken: list[str] = []
    try:
        _write(gc, "a")

        async def caller() -> None:
            await gc.durable()
            woken.extend(store.order)
            assert _on_disk(store.path, "a")  # acknowledged means committed

        await caller()
        # The caller ran after the commit callback, before the flush coroutine resumed.
        assert woken == ["on_durable"]
    finally:
        await gc.durable()
        await store.close()


async def test_a_cancelled_caller_does_not_disturb_the_others(tmp_path: Path) -> None:
    store = SlowResumeStore(tmp_path)
    gc = _commit(store)
    try:
        _write(gc, "a")
        waiters = [asyncio.ensure_future(gc.durable()) for _ in range(5)]
        await asyncio.sleep(0)
        waiters[2].cancel()
        done = await asyncio.gather(*waiters, return_exceptions=True)
        assert isinstance(done[2], asyncio.CancelledError)
        assert [d for i, d in enumerate(done) if i != 2] == [None] * 4
        assert _on_disk(store.path, "a")
    finally:
        await store.close()


async def test_asking_after_the_ack_but_before_the_flush_task_resumed_returns(tmp_path: Path) -> None:
    store = SlowResumeStore(tmp_path)
    store.resume_delay = 0.5  # the flush task resumes late: its batch is still "in flight"
    gc = _commit(store)
    try:
        _write(gc, "a")
        await gc.durable()  # acknowledged by the callback
        assert store.order == ["on_durable"]  # flush() has not returned: the batch is in flight
        # A caller with nothing of its own to commit waits for the batch in flight: already durable.
        await asyncio.wait_for(gc.durable(), 0.2)
        # A new operation meanwhile is its own batch, committed after the in-flight one.
        _write(gc, "b")
        await asyncio.wait_for(gc.durable(), 5)
        assert _on_disk(store.path, "b")
    finally:
        await asyncio.sleep(0.6)
        await store.close()


async def test_a_failed_commit_reaches_every_caller(tmp_path: Path) -> None:
    store = SlowResumeStore(tmp_path)
    gc = _commit(store)
    try:
        with gc.op() as op:
            # Two rows for one primary key inside one batch are fine (upsert); a run row without its
            # NOT NULL columns is not: the commit fails as a whole.
            op.runs["r"] = RunRow("r", "a", None, 1, 1, [])  # type: ignore[arg-type]
        waiters = [asyncio.ensure_future(gc.durable()) for _ in range(3)]
        done = await asyncio.gather(*waiters, return_exceptions=True)
        assert all(isinstance(d, sqlite3.IntegrityError) for d in done), done
        assert not _on_disk(store.path, "a")
    finally:
        await store.close()


class CountingStore(SlowResumeStore):
    """Counts the commits (`flush()` calls) and remembers when each started."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.flushes: list[float] = []

    async def flush(self, on_durable: object = None) -> None:  # type: ignore[override]
        self.flushes.append(asyncio.get_running_loop().time())
        await super().flush(on_durable)


async def test_lazy_operations_linger_and_share_a_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(group_commit, "LINGER_SECONDS", 0.2)
    store = CountingStore(tmp_path)
    gc = _commit(store)
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for i in range(5):  # a run streaming: five chunks 20 ms apart, nobody waiting for them
            _write(gc, f"chunk{i}", lazy=True)
            await asyncio.sleep(0.02)
        assert store.flushes == []  # still lingering: no commit yet
        for _ in range(100):
            if store.flushes:
                break
            await asyncio.sleep(0.02)
        assert len(store.flushes) == 1  # one commit for all five
        assert store.flushes[0] - t0 >= 0.19  # not before the linger ran out
        await asyncio.sleep(0.05)
        assert all(_on_disk(store.path, f"chunk{i}") for i in range(5))
    finally:
        await store.close()


async def test_an_operation_somebody_waits_for_ends_the_linger_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(group_commit, "LINGER_SECONDS", 30.0)
    store = CountingStore(tmp_path)
    gc = _commit(store)
    try:
        _write(gc, "chunk", lazy=True)
        await asyncio.sleep(0.05)
        assert store.flushes == []  # lingering
        _write(gc, "cancel")  # e.g. a cancel: its caller waits for the commit
        await asyncio.wait_for(gc.durable(), 5)  # long before the 30 s linger
        assert _on_disk(store.path, "chunk") and _on_disk(store.path, "cancel")  # one batch, both
        assert len(store.flushes) == 1
        _write(gc, "chunk2", lazy=True)
        await asyncio.wait_for(gc.durable(), 5)  # a caller waiting for lazy work hurries it too
        assert _on_disk(store.path, "chunk2")
    finally:
        await store.close()
