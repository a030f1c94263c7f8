"""Run control as a real process for the fault tests: start it on a config file, follow its streams
across crashes and failovers, and wait until its sessions are idle."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import TypeVar

import grpc
from flynn.v1 import run_control_pb2 as pb
from flynn.v1 import run_control_pb2_grpc as pb_grpc

from tests.support.mesh import ServiceProcess, Tokens
from tests.support.queue import TERMINAL_EVENTS

Metadata = tuple[tuple[str, str], ...]
T = TypeVar("T")


def start_queue_process(
    tmp_path: Path, tokens: Tokens, config_yaml: str, extra: list[str] | None = None
) -> ServiceProcess:
    """queue_svc.main with `config_yaml` as its --queue-config-file (and `extra` flags) and its data
    under tmp_path/data; started (the caller stops it)."""
    cfg = tmp_path / "queue.yaml"
    cfg.write_text(config_yaml)
    proc = ServiceProcess(
        "queue", "queue_svc.main", tmp_path / "data", tokens,
        extra=["--queue-config-file", str(cfg), *(extra or [])],
    )  # fmt: skip
    proc.start()
    return proc


class Consumer:
    """A WatchRunEvents + StreamReplies consumer that keeps its cursors across reconnects and asserts
    on every event that the stream has no gap and no repeat.

    reconnect=False: a stream ends at its first error (the process died; the test restarts the
    streams with `start()` on a new stub). reconnect=True: it resumes from its cursors after any
    error (a gateway in front of replicas), and asserts the same of the replies' cursors."""

    def __init__(self, stub: pb_grpc.RunControlStub, md: Metadata, *, reconnect: bool = False) -> None:
        self.stub, self.md = stub, md
        self.reconnect = reconnect
        self.events: list[pb.RunEvent] = []
        self.replies: list[pb.Reply] = []
        self.cursor = 0
        self.reply_cursor = 0
        self.reconnects = 0

    def start(self) -> list[asyncio.Task[None]]:
        """Both streams as tasks (the caller cancels or awaits them)."""
        return [asyncio.ensure_future(self.watch()), asyncio.ensure_future(self.follow_replies())]

    async def watch(self) -> None:
        await self._follow(
            lambda: self.stub.WatchRunEvents(
                pb.WatchRunEventsRequest(after_seq=self.cursor), metadata=self.md
            ),
            self._event,
        )

    async def follow_replies(self) -> None:
        await self._follow(
            lambda: self.stub.StreamReplies(
                pb.StreamRepliesRequest(after_cursor=self.reply_cursor), metadata=self.md
            ),
            self._reply,
        )

    def _event(self, resp: pb.WatchRunEventsResponse) -> None:
        assert resp.event.global_seq == self.cursor + 1, (resp.event.global_seq, self.cursor)
        self.events.append(resp.event)
        self.cursor = resp.event.global_seq

    def _reply(self, resp: pb.StreamRepliesResponse) -> None:
        if self.reconnect:
            assert resp.reply.cursor == self.reply_cursor + 1, (resp.reply.cursor, self.reply_cursor)
        self.replies.append(resp.reply)
        self.reply_cursor = resp.reply.cursor

    async def _follow(self, open_stream: Callable[[], AsyncIterator[T]], take: Callable[[T], None]) -> None:
        """Read a stream opened from the current cursor; after it ends, again if reconnecting."""
        while True:
            try:
                async for resp in open_stream():
                    take(resp)
            except grpc.aio.AioRpcError:
                pass
            if not await self._again():
                return

    def assert_nothing_lost(self, acked: dict[tuple[str, str], str], runs: list[pb.Run]) -> None:
        """Every acknowledged message ((session, idempotency key) -> message id) is in one of `runs`,
        or a MESSAGE_DROPPED event this consumer read says why not."""
        in_runs = {m for r in runs for m in r.message_ids}
        dropped = {
            e.message_id for e in self.events if e.type == pb.RUN_EVENT_TYPE_MESSAGE_DROPPED and e.reason
        }
        lost = [k for k, m in acked.items() if m not in in_runs and m not in dropped]
        assert not lost, lost[:5]

    def assert_one_terminal_each(self, runs: list[pb.Run]) -> None:
        """Every run in `runs` has exactly one terminal event in what this consumer read."""
        terminals = Counter(e.run_id for e in self.events if e.type in TERMINAL_EVENTS)
        assert all(terminals[r.run_id] == 1 for r in runs), [
            r.run_id for r in runs if terminals[r.run_id] != 1
        ]

    async def _again(self) -> bool:
        """After a stream ended: whether to open it again (from the cursor), after a short pause."""
        if not self.reconnect:
            return False
        self.reconnects += 1
        await asyncio.sleep(0.05)
        return True


async def sessions_idle(
    stub: pb_grpc.RunControlStub,
    md: Metadata,
    keys: Iterable[str],
    *,
    polls: int,
    every: float,
    call_timeout: float,
) -> bool:
    """Poll (at most `polls` times, `every` seconds apart) until none of the sessions `keys` has an active
    run or a queue (each GetSession within `call_timeout` seconds); False when they never were."""
    keys = list(keys)
    for _ in range(polls):
        for key in keys:
            s = (
                await stub.GetSession(
                    pb.GetSessionRequest(session_key=key), metadata=md, timeout=call_timeout
                )
            ).session
            if s.active_run_id or s.queue:
                break
        else:
            return True
        await asyncio.sleep(every)
    return False


async def all_runs(stub: pb_grpc.RunControlStub, md: Metadata) -> list[pb.Run]:
    """Every run, read page by page (ListRuns, 500 a page)."""
    runs: list[pb.Run] = []
    token = ""
    while True:
        page = await stub.ListRuns(
            pb.ListRunsRequest(page_size=500, page_token=token), metadata=md, timeout=10
        )
        runs.extend(page.runs)
        token = page.next_page_token
        if not token:
            return runs


async def assert_still_acknowledged(
    stub: pb_grpc.RunControlStub, md: Metadata, acked: dict[tuple[str, str], str]
) -> None:
    """Every acknowledged message ((session, idempotency key) -> message id) is still there: its key
    answers DUPLICATE with the same id."""
    for (session, key), mid in acked.items():
        resp = await stub.SubmitMessage(
            pb.SubmitMessageRequest(session_key=session, channel="t", text="again", idempotency_key=key),
            metadata=md, timeout=5,
        )  # fmt: skip
        assert resp.disposition == pb.DISPOSITION_DUPLICATE and resp.message_id == mid, key
