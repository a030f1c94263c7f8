"""WatchRunEvents and StreamReplies: replay from a cursor then live, without gaps or repeats."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from flynn.v1 import run_control_pb2 as pb

from tests.support.mesh import Tokens
from tests.support.queue import queue_service, wait_for


async def test_watch_replays_then_follows_without_gaps(tmp_path: Path, tokens: Tokens) -> None:
    async with queue_service(tmp_path, tokens, "server: {queue: {mode: followup}, agent: {chunks: 2}}") as q:
        for i in range(20):
            await q.submit(f"s{i % 3}", f"m{i}")

        async def writer() -> None:
            for i in range(20, 60):
                await q.submit(f"s{i % 3}", f"m{i}")

        # Start watching from a cursor in the middle while writes continue: replay and live must join.
        w = asyncio.ensure_future(writer())
        seen: list[pb.RunEvent] = []
        call = q.stub.WatchRunEvents(pb.WatchRunEventsRequest(after_seq=10), metadata=q.md)

        async def read() -> None:
            async for resp in call:
                seen.append(resp.event)
                if len(seen) >= 50 and w.done():
                    total = q.rc.global_seq
                    if seen[-1].global_seq >= total:
                        return

        await asyncio.wait_for(read(), 30)
        call.cancel()
        await w
        assert [e.global_seq for e in seen] == list(range(11, 11 + len(seen)))
        assert seen[-1].global_seq == q.rc.global_seq


async def test_watch_session_filter_and_exclude_output(tmp_path: Path, tokens: Tokens) -> None:
    async with queue_service(tmp_path, tokens, "server: {agent: {chunks: 3}}") as q:
        a = await q.submit("a", "x")
        await q.submit("b", "y")
        await q.wait_run(a.run_id)
        call = q.stub.WatchRunEvents(
            pb.WatchRunEventsRequest(session_key="a", exclude_output=True), metadata=q.md
        )
        got = []
        async for resp in call:
            got.append(resp.event)
            if resp.event.type == pb.RUN_EVENT_TYPE_RUN_COMPLETED:
                break
        call.cancel()
        assert {e.session_key for e in got} == {"a"}
        assert [e.session_seq for e in got] == [1, 2, 3, 7]  # 4..6 are the three output chunks
        assert all(e.type != pb.RUN_EVENT_TYPE_RUN_OUTPUT for e in got)
        assert got[-1].text == "echo: x"


async def test_stream_replies_cursor_and_channels(tmp_path: Path, tokens: Tokens) -> None:
    async with queue_service(tmp_path, tokens) as q:
        runs = []
        for i in range(4):
            r = await q.submit(f"s{i}", f"t{i}", channel="tg" if i % 2 == 0 else "slack")
            runs.append(r)
        for r in runs:
            await q.wait_run(r.run_id)
        replies = q.replies()
        assert [r.cursor for r in replies] == [1, 2, 3, 4]
        call = q.stub.StreamReplies(pb.StreamRepliesRequest(after_cursor=1, channels=["tg"]), metadata=q.md)
        first = await call.read()
        assert first.reply.channel == "tg" and first.reply.cursor == 3
        late = await q.submit("s9", "late", channel="tg")
        nxt = await call.read()
        assert nxt.reply.run_id == late.run_id and nxt.reply.reply_id == f"rpl_{late.run_id[4:]}"
        call.cancel()
        # A replay returns the same reply ids (adapters deduplicate on them).
        again = q.stub.StreamReplies(pb.StreamRepliesRequest(after_cursor=0), metadata=q.md)
        ids = [(await again.read()).reply.reply_id for _ in range(5)]
        again.cancel()
        assert ids == [r.reply_id for r in q.replies()]


async def test_streams_end_on_shutdown(tmp_path: Path, tokens: Tokens) -> None:
    async with queue_service(tmp_path, tokens) as q:
        events = q.stub.WatchRunEvents(pb.WatchRunEventsRequest(), metadata=q.md)
        replies = q.stub.StreamReplies(pb.StreamRepliesRequest(), metadata=q.md)
        await q.submit("s", "x")
        await events.read()
        q.server.runtime.stopping.set()
        for call in (events, replies):
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                while True:
                    r = await asyncio.wait_for(call.read(), 10)
                    if r is grpc.aio.EOF:
                        break
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_cancelled_streams_unsubscribe(tmp_path: Path, tokens: Tokens) -> None:
    async with queue_service(tmp_path, tokens) as q:
        calls = [q.stub.WatchRunEvents(pb.WatchRunEventsRequest(), metadata=q.md) for _ in range(5)]
        calls += [q.stub.StreamReplies(pb.StreamRepliesRequest(), metadata=q.md) for _ in range(5)]
        await q.submit("s", "x")
        for c in calls[:5]:
            await c.read()
        assert q.rc.events.subscribers + q.rc.replies.subscribers == 10
        for c in calls:
            c.cancel()

        async def count() -> int:
            return q.rc.events.subscribers + q.rc.replies.subscribers

        await wait_for(count, lambda n: n == 0)


async def test_list_runs_pages_newest_first(tmp_path: Path, tokens: Tokens) -> None:
    async with queue_service(tmp_path, tokens) as q:
        ids = []
        for i in range(7):
            r = await q.submit(f"s{i % 2}", f"t{i}")
            await q.wait_run(r.run_id)
            ids.append(r.run_id)
        seen: list[str] = []
        token = ""
        pages = 0
        while True:
            page = await q.stub.ListRuns(pb.ListRunsRequest(page_size=3, page_token=token), metadata=q.md)
            seen.extend(r.run_id for r in page.runs)
            pages += 1
            token = page.next_page_token
            if not token:
                break
        assert seen == list(reversed(ids)) and pages == 3
        only = await q.stub.ListRuns(pb.ListRunsRequest(session_key="s1"), metadata=q.md)
        assert [r.run_id for r in only.runs] == [ids[5], ids[3], ids[1]]
        done = await q.stub.ListRuns(pb.ListRunsRequest(state=pb.RUN_STATE_CANCELLED), metadata=q.md)
        assert list(done.runs) == []
