"""Test support for run control: an in-process queue service with a hand-set config, and helpers."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psycopg
from flynn.v1 import config_pb2
from flynn.v1 import run_control_pb2 as pb
from flynn.v1 import run_control_pb2_grpc as pb_grpc

from flynn_runtime import config_yaml
from flynn_runtime.config_source import StaticConfig
from flynn_runtime.database import Database
from flynn_runtime.server import RunningServer, running
from queue_svc.app import QueueApp
from queue_svc.run_control import RunControl
from queue_svc.store import RUN_COLS, Row, RunRow, run_from
from queue_svc.store_pg import PgQueueStore
from queue_svc.store_sqlite import SqliteQueueStore
from tests.support.mesh import Tokens, make_settings

TERMINAL = (pb.RUN_STATE_CANCELLED, pb.RUN_STATE_COMPLETED, pb.RUN_STATE_ERROR)
TERMINAL_EVENTS = (
    pb.RUN_EVENT_TYPE_RUN_CANCELLED,
    pb.RUN_EVENT_TYPE_RUN_COMPLETED,
    pb.RUN_EVENT_TYPE_RUN_ERROR,
)


def config(yaml_text: str = "") -> config_pb2.FlynnConfig:
    return config_yaml.yaml_to_config(yaml_text or "{}")


@dataclass
class QueueHarness:
    server: RunningServer
    source: StaticConfig
    channel: grpc.aio.Channel
    stub: pb_grpc.RunControlStub
    md: tuple[tuple[str, str], ...]

    @property
    def rc(self) -> RunControl:
        app = self.server.app
        assert isinstance(app, QueueApp) and app.rc is not None
        return app.rc

    async def set_config(self, yaml_text: str) -> None:
        await self.source.apply(config(yaml_text), self.source.revision + 1)

    async def submit(
        self, session: str, text: str, key: str | None = None, channel: str = "test", **kw: Any
    ) -> pb.SubmitMessageResponse:
        req = pb.SubmitMessageRequest(
            session_key=session,
            channel=channel,
            sender="u1",
            text=text,
            idempotency_key=key or f"{session}/{text}",
            **kw,
        )
        resp: pb.SubmitMessageResponse = await self.stub.SubmitMessage(req, metadata=self.md, timeout=10)
        return resp

    async def cancel(self, **kw: Any) -> pb.CancelRunResponse:
        resp: pb.CancelRunResponse = await self.stub.CancelRun(
            pb.CancelRunRequest(**kw), metadata=self.md, timeout=10
        )
        return resp

    async def post_reply_notice(self, session: str, text: str, channel: str = "test") -> pb.PostReplyResponse:
        resp: pb.PostReplyResponse = await self.stub.PostReply(
            pb.PostReplyRequest(kind=pb.REPLY_KIND_NOTICE, session_key=session, channel=channel, text=text,
                                idempotency_key=f"notice/{session}/{text}"),
            metadata=self.md, timeout=10,
        )  # fmt: skip
        return resp

    async def get_run(self, run_id: str) -> pb.Run:
        resp = await self.stub.GetRun(pb.GetRunRequest(run_id=run_id), metadata=self.md, timeout=10)
        return resp.run

    async def wait_run(self, run_id: str, within: float = 15.0) -> pb.Run:
        return await wait_for(lambda: self.get_run(run_id), lambda r: r.state in TERMINAL, within)

    async def wait_idle(self, session: str, within: float = 15.0) -> pb.Session:
        async def get() -> pb.Session:
            resp = await self.stub.GetSession(
                pb.GetSessionRequest(session_key=session), metadata=self.md, timeout=10
            )
            return resp.session

        return await wait_for(get, lambda s: not s.active_run_id and not s.queue, within)

    def _read(self, sql: str, params: tuple[object, ...]) -> list[Row]:
        """Committed rows read straight from the service's database (SQLite file or PostgreSQL), with
        a connection of the test's own: a synchronous helper for assertions, not a service path."""
        store = self.rc.store
        if isinstance(store, PgQueueStore):
            conninfo = Database.conninfo(store.db.settings, store.db.schema, store.db.timeouts, "flynn-tests")
            with psycopg.connect(conninfo) as conn:
                return conn.execute(sql.replace("?", "%s"), params).fetchall()
        assert isinstance(store, SqliteQueueStore)
        with contextlib.closing(sqlite3.connect(store.path)) as db:
            return [tuple(r) for r in db.execute(sql, params).fetchall()]

    def events(self, session: str = "", exclude_output: bool = False) -> list[pb.RunEvent]:
        """Every durable event (of `session` when given), in global order."""
        rows = self._read(
            "SELECT data FROM events WHERE (? = '' OR session_key = ?) AND global_seq <= ? ORDER BY global_seq",
            (session, session, self.rc.global_seq),
        )
        out = [pb.RunEvent.FromString(bytes(r[0])) for r in rows]
        return [e for e in out if not (exclude_output and e.type == pb.RUN_EVENT_TYPE_RUN_OUTPUT)]

    def replies(self) -> list[pb.Reply]:
        """Every reply with a cursor (streamed), in cursor order."""
        rows = self._read(
            "SELECT data FROM replies WHERE cursor IS NOT NULL AND cursor <= ? ORDER BY cursor",
            (self.rc.commit.durable_cursor,),
        )
        return [pb.Reply.FromString(bytes(r[0])) for r in rows]

    def runs(self) -> list[RunRow]:
        """Every run in the store, newest first."""
        return [run_from(r) for r in self._read(f"SELECT {RUN_COLS} FROM runs ORDER BY seq DESC", ())]


async def wait_for(get: Callable[[], Any], ok: Callable[[Any], bool], within: float = 15.0) -> Any:
    deadline = time.monotonic() + within
    value = await get()
    while not ok(value):
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met; last value: {value}")
        await asyncio.sleep(0.01)
        value = await get()
    return value


@asynccontextmanager
async def queue_service(
    data_dir: Path, tokens: Tokens, yaml_text: str = "", addresses: dict[str, str] | None = None
) -> AsyncIterator[QueueHarness]:
    source = StaticConfig(config(yaml_text), revision=1)
    settings = make_settings("queue", data_dir, tokens, addresses=addresses)
    async with running(settings, lambda rt: QueueApp(rt, config=source)) as srv:
        ch = grpc.aio.insecure_channel(srv.address)
        try:
            yield QueueHarness(srv, source, ch, pb_grpc.RunControlStub(ch), tokens.md("operator"))
        finally:
            await ch.close()


def short(events: list[pb.RunEvent]) -> list[tuple[str, str]]:
    """(event type, run-or-message label) pairs, for exact sequence assertions."""
    return [(pb.RunEventType.Name(e.type).removeprefix("RUN_EVENT_TYPE_"), e.reason) for e in events]
