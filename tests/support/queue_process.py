"""Run control as a real process for the fault tests: start it on a config file, follow its streams
across crashes and failovers, and wait until its sessions are idle."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path

import grpc
from flynn.v1 import run_control_pb2 as pb
from flynn.v1 import run_control_pb2_grpc as pb_grpc

from tests.support.mesh import ServiceProcess, Tokens

Metadata = tuple[tuple[str, str], ...]


def start_queue_process(tmp_path: Path, tokens: Tokens, config_yaml: str) -> ServiceProcess:
    """queue_svc.main with `config_yaml` as its --queue-config-file and its data under tmp_path/data;
    started (the caller stops it)."""
    cfg = tmp_path / "queue.yaml"
    cfg.write_text(config_yaml)
    proc = ServiceProcess(
        "queue", "queue_svc.main", tmp_path / "data", tokens, extra=["--queue-config-file", str(cfg)]
    )
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
        while True:
            try:
                req = pb.WatchRunEventsRequest(after_seq=self.cursor)
                async for resp in self.stub.WatchRunEvents(req, metadata=self.md):
                    assert resp.event.global_seq == self.cursor + 1, (resp.event.global_seq, self.cursor)
                    self.events.append(resp.event)
                    self.cursor = resp.event.global_seq
            except grpc.aio.AioRpcError:
                pass
            if not await self._again():
                return

    async def follow_replies(self) -> None:
        while True:
            try:
                req = pb.StreamRepliesRequest(after_cursor=self.reply_cursor)
                async for resp in self.stub.StreamReplies(req, metadata=self.md):
                    if self.reconnect:
                        assert resp.reply.cursor == self.reply_cursor + 1, (
                            resp.reply.cursor,
                            self.reply_cursor,
                        )
                    self.replies.append(resp.reply)
                    self.reply_cursor = resp.reply.cursor
            except grpc.aio.AioRpcError:
                pass
            if not await self._again():
                return

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
