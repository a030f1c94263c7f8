"""`flynn db import` then `flynn db export` round-trips a SQLite data dir through a real PostgreSQL:
the same config revisions and principals (issued, revoked, revoked tokens-file hashes), reactions
state and traces, nodes, tokens, events and artifact bytes."""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import sys
from pathlib import Path

from flynn.v1 import config_pb2, nodes_pb2, reactions_pb2

from config_svc.principal_store_pg import PgPrincipalStore
from config_svc.principal_store_sqlite import SqlitePrincipalStore
from config_svc.revision_store import SCHEMA as CONFIG_SCHEMA
from config_svc.revision_store_pg import MIGRATIONS as CONFIG_MIGRATIONS
from config_svc.revision_store_sqlite import SqliteRevisionStore
from flynn_launcher.local_postgres import LocalPostgres
from flynn_runtime.audit import AuditLog
from flynn_runtime.auth import Role
from flynn_runtime.config_source import StaticConfig
from flynn_runtime.database import Database
from flynn_runtime.database_url import parse_database_url
from nodes_svc.canvas_store import CanvasStore
from nodes_svc.canvas_store_pg import PgCanvasStore
from nodes_svc.node_registry import NodeRegistry
from nodes_svc.node_store import SCHEMA as NODES_SCHEMA
from nodes_svc.node_store_pg import MIGRATIONS as NODES_MIGRATIONS
from nodes_svc.node_store_sqlite import SqliteNodeStore
from reactions_svc.reactor import ActionContext, ActionOutcome, Reactor
from reactions_svc.rules import RuleSet
from reactions_svc.store_sqlite import SqliteReactionStore
from tests.support.mesh import make_tokens
from tests.support.nodes import nodes_config
from tests.support.queue import queue_service
from tests.support.reactions import ack_action, rule

ROOT = Path(__file__).resolve().parents[2]
MSG = config_pb2.REACTION_EVENT_TYPE_MESSAGE_RECEIVED


class Runner:
    async def run(self, kind: str, action: config_pb2.ReactionAction, ctx: ActionContext) -> ActionOutcome:
        return ActionOutcome(True, result_id=f"r-{ctx.idempotency_key}")


async def make_data_dir(mesh: Path) -> None:
    """A flynn-dev layout (one subdirectory per service) with state in every table."""
    revs = SqliteRevisionStore(mesh / "config" / "config" / "config.db")
    for i in range(30):
        await revs.append(2, "op", f"change {i}", [("a.b", str(i), str(i + 1))], f"config {i}".encode())
    await revs.close()

    principals = SqlitePrincipalStore(mesh / "config" / "config" / "principals.db")
    await principals.issue("alice", Role.OPERATOR, [], "operator:admin")
    await principals.issue("telegram-bot", Role.CHANNEL, ["telegram", "télé"], "operator:alice")
    await principals.issue("old-bot", Role.CHANNEL, ["sms"], "operator:alice")
    await principals.issue("agent-1", Role.AGENT, [], "operator:alice")
    await principals.revoke_issued("old-bot", "", "operator:alice")
    await principals.revoke_file_hash("ab" * 32, "channel", "operator:alice")
    await principals.close()

    store = SqliteReactionStore(mesh / "reactions" / "reactions")
    rs = RuleSet(
        [rule("greet", keywords=("hello",), actions=[ack_action()]), rule("never", keywords=("zzz",))], 3
    )
    reactor = Reactor(store, lambda: rs, Runner())
    for i in range(20):
        ev = reactions_pb2.ReactionEvent(
            event_id=f"run:{i}", type=MSG, text="hello" if i % 2 else "nothing", session_key=f"s{i % 3}"
        )
        await reactor.handle(ev)
    await reactor.flag_false_positive("run:1/greet", "not a greeting")
    await store.set_cursor("run_events", 20)
    await store.close()

    nodes = SqliteNodeStore(mesh / "nodes" / "nodes" / "nodes.sqlite")
    reg = NodeRegistry(nodes, StaticConfig(nodes_config()), AuditLog(mesh / "nodes", "nodes"))
    await reg.start()
    for n in range(3):
        tok = await reg.issue_token(f"node-{n}", "desktop", "test")
        session, _ = await reg.register(
            nodes_pb2.NodeRegister(
                node_id=f"node-{n}",
                token=tok.token,
                role="desktop",
                capabilities=["device.info"],
                protocol_version=1,
            ),
            "ipv4:127.0.0.1:1",
        )
        reg.end_session(session)
    reg.shutdown()
    await reg.drain()
    await nodes.close()

    canvas = CanvasStore(mesh / "nodes" / "canvas")
    canvas.recover()
    for i in range(12):
        canvas.put(
            f"docs/{i % 5}", "text/plain", hashlib.sha256(str(i).encode()).digest() * (i + 1), "", "op"
        )
    canvas.delete("docs/4", "")
    canvas.close()

    # Run control: sessions, messages, runs, events, finals, a collect buffer left queued.
    tokens = make_tokens(mesh)
    async with queue_service(
        mesh / "queue", tokens, "server: {queue: {mode: followup}, agent: {chunks: 2}}"
    ) as q:
        for i in range(12):
            await q.submit(f"s{i % 3}", f"m{i}")
        for i in range(3):
            await q.wait_idle(f"s{i}")
        await q.post_reply_notice("s0", "hello")
        await q.set_config("server: {queue: {mode: collect, quiet_window: 1h}}")
        await q.submit("s9", "waits in a collect buffer")


def dump(db_file: Path) -> dict[str, list[tuple[object, ...]]]:
    """Every row of every table (sorted), without SQLite's own bookkeeping tables."""
    conn = sqlite3.connect(db_file)
    try:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {
            n: sorted(conn.execute(f'SELECT * FROM "{n}"').fetchall(), key=repr)
            for n in names
            if not n.startswith("sqlite_")
        }
    finally:
        conn.close()


def blob_hashes(canvas_dir: Path) -> dict[str, str]:
    conn = sqlite3.connect(canvas_dir / "index.sqlite")
    try:
        rows = conn.execute("SELECT name, version, blob FROM versions").fetchall()
    finally:
        conn.close()
    return {
        f"{n}@{v}": hashlib.sha256((canvas_dir / "blobs" / b).read_bytes()).hexdigest() for n, v, b in rows
    }


def flynn(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flynn_cli.main", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


async def test_import_then_export_round_trips_a_data_dir(
    tmp_path: Path, postgres: LocalPostgres, postgres_url: str
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    await make_data_dir(a)
    pw = tmp_path / "pw"
    pw.write_text(postgres.password)
    url = postgres_url.replace(f":{postgres.password}@", "@")
    common = ["--database-url", url, "--database-password-file", str(pw)]

    imported = flynn("db", "import", "--data-dir", str(a), *common)
    assert imported.returncode == 0, imported.stderr
    assert "config: imported 30 revisions, 4 principals, 1 revoked file principals" in imported.stdout
    assert "artifact_versions" in imported.stdout
    assert "queue: imported 4 sessions" in imported.stdout, imported.stdout

    # A second import into the same database is refused, naming the schema.
    again = flynn("db", "import", "--data-dir", str(a), *common)
    assert again.returncode == 2 and "schema flynn_config" in again.stderr and "already holds" in again.stderr

    # The PostgreSQL backends serve what was copied (principals, bytes and hashes included).
    config_db = await Database.open(
        parse_database_url(url, pw), service="t", schema=CONFIG_SCHEMA, migrations=CONFIG_MIGRATIONS
    )
    try:
        got = await PgPrincipalStore(config_db).load()
        assert got.version > 0
        assert [(r.name, r.channels) for r in got.active()] == [
            ("alice", ()),
            ("telegram-bot", ("telegram", "télé")),
            ("agent-1", ()),
        ]
        assert len(got.revoked_hashes()) == 2 and "ab" * 32 in got.revoked_hashes()
    finally:
        await config_db.close()
    db = await Database.open(
        parse_database_url(url, pw), service="t", schema=NODES_SCHEMA, migrations=NODES_MIGRATIONS
    )
    try:
        canvas = PgCanvasStore(db)
        await canvas.recover()
        meta, content = await canvas.get("docs/1")
        assert hashlib.sha256(content).hexdigest() == meta.sha256
        async with db.connection() as c:
            row = await (await c.execute("SELECT COALESCE(SUM(size), 0) FROM canvas_versions")).fetchone()
        assert row is not None and canvas.total_bytes == int(row[0]) > 0
    finally:
        await db.close()

    exported = flynn("db", "export", "--data-dir", str(b), *common)
    assert exported.returncode == 0, exported.stderr
    for rel in (
        "config/config/config.db",
        "config/config/principals.db",
        "reactions/reactions/reactions.db",
        "nodes/nodes/nodes.sqlite",
        "nodes/canvas/index.sqlite",
        "queue/queue/run_control.db",
    ):
        assert dump(b / rel) == dump(a / rel), rel
    assert blob_hashes(b / "nodes" / "canvas") == blob_hashes(a / "nodes" / "canvas")
    assert len(blob_hashes(a / "nodes" / "canvas")) > 5

    refused = flynn("db", "export", "--data-dir", str(b), *common)
    assert refused.returncode == 2 and "already exists" in refused.stderr
