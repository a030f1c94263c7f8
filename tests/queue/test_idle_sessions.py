"""Idle sessions leave memory and come back on demand, with nothing lost: sequence numbers continue,
counters stay right, idempotency keys still answer, cancel and GetSession find them. Start-up loads
only the sessions that have work (a queued or active run, a queue entry)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import psycopg
import pytest
from flynn.v1 import run_control_pb2 as pb

from tests.support.mesh import Tokens
from tests.support.queue import queue_service, wait_for

CFG = "server: {queue: {mode: followup}, agent: {chunks: 2}}"


async def test_evicted_sessions_reload_on_demand(tmp_path: Path, tokens: Tokens) -> None:
    async with queue_service(tmp_path, tokens, CFG) as q:
        for i in range(3):
            await q.submit(f"s{i}", "one")
            await q.submit(f"s{i}", "two")
        for i in range(3):
            await q.wait_idle(f"s{i}")
        await q.rc.durable()
        before = {s: (await q.stub.GetSession(pb.GetSessionRequest(session_key=s), metadata=q.md)).session
                  for s in ("s0", "s1", "s2")}  # fmt: skip
        assert len(q.rc.evict_idle(0)) == 3 and not q.rc._sessions

        # GetSession reads it back as it was.
        got = (await q.stub.GetSession(pb.GetSessionRequest(session_key="s0"), metadata=q.md)).session
        assert got == before["s0"]
        # A duplicate key answers DUPLICATE from the store.
        dup = await q.submit("s1", "two")
        assert dup.disposition == pb.DISPOSITION_DUPLICATE
        # A new message continues the session's numbering (no second session_seq 1).
        r = await q.submit("s1", "three")
        await q.wait_idle("s1")
        events = q.events("s1")
        assert [e.session_seq for e in events] == list(range(1, len(events) + 1))
        s1 = (await q.stub.GetSession(pb.GetSessionRequest(session_key="s1"), metadata=q.md)).session
        assert (s1.message_count, s1.run_count) == (3, 3)
        assert s1.last_session_seq == events[-1].session_seq
        # Cancel by session key and by a finished run's id find evicted sessions.
        q.rc.evict_idle(0)
        c = await q.cancel(session_key="s2")
        assert c.outcome == pb.CANCEL_OUTCOME_NO_ACTIVE_RUN
        q.rc.evict_idle(0)
        c = await q.cancel(run_id=r.run_id)
        assert c.outcome == pb.CANCEL_OUTCOME_ALREADY_COMPLETED
        # PostReply into an evicted session keeps its numbering too.
        q.rc.evict_idle(0)
        await q.post_reply_notice("s2", "hello")
        await q.submit("s2", "after the notice")
        await q.wait_idle("s2")
        seqs = [e.session_seq for e in q.events("s2")]
        assert seqs == list(range(1, len(seqs) + 1))


async def test_busy_sessions_stay_and_start_up_loads_only_them(tmp_path: Path, tokens: Tokens) -> None:
    async with queue_service(tmp_path, tokens, CFG) as q:
        for i in range(20):
            await q.submit(f"idle{i}", "hi")
        for i in range(20):
            await q.wait_idle(f"idle{i}")
        await q.set_config("server: {queue: {mode: collect, quiet_window: 1h}, agent: {think_time: 300ms}}")
        # The first message starts a run at once; the second, sent with it, waits in the collect
        # buffer for the (hour-long) quiet window.
        await asyncio.gather(q.submit("busy", "runs"), q.submit("busy", "waits in a collect buffer"))
        await wait_for(lambda: asyncio.sleep(0, q.rc.session_active_state("busy")), lambda st: st == 0)
        await q.rc.durable()
        assert len(q.rc.evict_idle(0)) == 20
        assert set(q.rc._sessions) == {"busy"}  # a session with a queue is never evicted
    async with queue_service(tmp_path, tokens, "server: {queue: {mode: collect, quiet_window: 1h}}") as q:
        assert set(q.rc._sessions) == {"busy"}
        s = (await q.stub.GetSession(pb.GetSessionRequest(session_key="idle7"), metadata=q.md)).session
        assert s.message_count == 1 and s.run_count == 1
        busy = (await q.stub.GetSession(pb.GetSessionRequest(session_key="busy"), metadata=q.md)).session
        assert len(busy.queue) == 1


async def test_idle_sessions_leave_memory_by_themselves_and_reading_one_writes_nothing(
    tmp_path: Path, tokens: Tokens, monkeypatch: pytest.MonkeyPatch, queue_backend: str
) -> None:
    """The eviction loop runs on both backends (--session-idle-seconds); on PostgreSQL an evicted
    session's lease is released. Loading an idle session back (GetSession) commits nothing."""
    monkeypatch.setenv("FLYNN_SESSION_IDLE_SECONDS", "0.3")
    async with queue_service(tmp_path, tokens, CFG) as q:
        for i in range(3):
            await q.submit(f"s{i}", "hi")
        for i in range(3):
            await q.wait_idle(f"s{i}")
        await wait_for(lambda: asyncio.sleep(0, len(q.rc._sessions)), lambda n: n == 0)
        if queue_backend == "postgresql":

            async def held() -> int:
                async with await psycopg.AsyncConnection.connect(os.environ["FLYNN_DATABASE_URL"]) as c:
                    cur = await c.execute("SELECT count(*) FROM flynn_queue.leases WHERE holder <> ''")
                    row = await cur.fetchone()
                    return int(row[0]) if row else -1

            assert await wait_for(held, lambda n: n == 0) == 0
        batch = q.rc.store._batch
        got = (await q.stub.GetSession(pb.GetSessionRequest(session_key="s1"), metadata=q.md)).session
        assert (got.message_count, got.run_count) == (1, 1)
        assert q.rc.store._batch == batch  # nothing was written to read it
