"""Canvas domain on each backend (SQLite + files, PostgreSQL bytea): CAS, names, limits, versions,
recovery (files only)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from flynn.v1 import nodes_pb2

from flynn_runtime.errors import Code, FlynnError
from nodes_svc.canvas_store import (
    CanvasBackend,
    CanvasLimits,
    CanvasStore,
    SqliteCanvasBackend,
    name_problem,
    prefix_end,
    validate_name,
)
from nodes_svc.canvas_store_pg import PgCanvasStore
from nodes_svc.node_store import SCHEMA
from nodes_svc.node_store_pg import MIGRATIONS
from tests.support.postgres import Databases

Factory = Callable[..., Awaitable[CanvasBackend]]

BAD_NAMES = [
    "../x",
    "/etc/passwd",
    "a/../../b",
    "a\x00b",
    "a\\b",
    "..",
    ".",
    "a//b",
    "a/",
    "x" * 201,
    "a b",
    "ü",
]


def store(root: Path, **kw: int) -> CanvasStore:
    s = CanvasStore(root, CanvasLimits(**kw))
    s.recover()
    return s


@pytest.fixture
async def open_store(tmp_path: Path, database_url: str, databases: Databases) -> AsyncIterator[Factory]:
    """Opens the canvas on the backend under test with the given limits."""
    opened: list[CanvasBackend] = []

    async def factory(**kw: int) -> CanvasBackend:
        b: CanvasBackend
        if not database_url:
            b = SqliteCanvasBackend(CanvasStore(tmp_path / "canvas", CanvasLimits(**kw)))
        else:
            db = await databases.open(database_url, service="nodes", schema=SCHEMA, migrations=MIGRATIONS)
            b = PgCanvasStore(db, CanvasLimits(**kw))
        await b.recover()
        opened.append(b)
        return b

    yield factory
    for b in opened:
        await b.close()


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_refused_naming_the_field(name: str) -> None:
    assert name_problem(name) is not None
    with pytest.raises(FlynnError) as ei:
        validate_name(name)
    assert ei.value.code == Code.INVALID_ARGUMENT
    assert [v.field for v in ei.value.violations] == ["name"]


@pytest.mark.parametrize("name", ["a", "notes/today.md", "a-b_c.d/e/f", "x" * 200])
def test_good_names(name: str) -> None:
    assert name_problem(name) is None


async def test_put_get_versions_and_cas(open_store: Factory) -> None:
    s = await open_store()
    m1 = await s.put("notes/a", "text/plain", b"one", "*", "op")
    assert m1.version == 1 and m1.sha256 == hashlib.sha256(b"one").hexdigest()
    with pytest.raises(FlynnError) as ei:
        await s.put("notes/a", "text/plain", b"again", "*", "op")  # "*" only creates
    assert ei.value.code == Code.FAILED_PRECONDITION and ei.value.metadata["current_etag"] == m1.etag
    m2 = await s.put("notes/a", "text/markdown", b"two", m1.etag, "op")
    with pytest.raises(FlynnError) as ei:
        await s.put("notes/a", "text/plain", b"stale", m1.etag, "op")  # based on an old version
    assert ei.value.reason == "ETAG_MISMATCH" and ei.value.metadata["current_etag"] == m2.etag
    meta, content = await s.get("notes/a")
    assert (meta.version, content, meta.content_type) == (2, b"two", "text/markdown")
    assert (await s.get("notes/a", 1))[1] == b"one"
    with pytest.raises(FlynnError) as ei:
        await s.get("notes/a", 7)
    assert ei.value.code == Code.NOT_FOUND
    with pytest.raises(FlynnError):
        await s.delete("notes/a", m1.etag)
    assert await s.delete("notes/a", m2.etag) == 2
    with pytest.raises(FlynnError) as ei:
        await s.get("notes/a")
    assert ei.value.code == Code.NOT_FOUND
    # Versions are never reused after a delete, so an old etag can never match again.
    m3 = await s.put("notes/a", "text/plain", b"one", "*", "op")
    assert m3.version == 3 and m3.etag != m1.etag


async def test_concurrent_creates_have_one_winner(open_store: Factory) -> None:
    s = await open_store()
    results = await asyncio.gather(
        *(s.put("race", "text/plain", bytes([i]), "*", "op") for i in range(10)), return_exceptions=True
    )
    wins = [r for r in results if not isinstance(r, BaseException)]
    assert len(wins) == 1
    assert all(isinstance(r, FlynnError) and r.reason == "ETAG_MISMATCH" for r in results if r not in wins)


async def test_list_prefix_and_paging(open_store: Factory) -> None:
    s = await open_store()
    for i in range(7):
        await s.put(f"docs/{i}", "text/plain", b"x", "", "op")
    await s.put("other", "text/plain", b"x", "", "op")
    await s.put("docs/B", "text/plain", b"x", "", "op")  # byte order, as SQLite: digits < "B"
    page1 = await s.list_latest("docs/", "", 3)
    assert [m.name for m in page1] == ["docs/0", "docs/1", "docs/2"]
    rest = await s.list_latest("docs/", page1[-1].name, 100)
    assert [m.name for m in rest] == [f"docs/{i}" for i in range(3, 7)] + ["docs/B"]


async def test_list_prefix_is_an_exact_range(open_store: Factory) -> None:
    """The prefix is an index range (prefix_end): names just outside it on either side stay out."""
    s = await open_store()
    for name in ("doc", "docs", "docs-", "docs/a", "docs/z/9", "docs0", "doct", "a", "z"):
        await s.put(name, "text/plain", b"x", "", "op")
    assert [m.name for m in await s.list_latest("docs/", "", 100)] == ["docs/a", "docs/z/9"]
    assert [m.name for m in await s.list_latest("docs", "", 100)] == [
        "docs",
        "docs-",
        "docs/a",
        "docs/z/9",
        "docs0",
    ]
    assert [m.name for m in await s.list_latest("docs", "docs-", 100)] == ["docs/a", "docs/z/9", "docs0"]
    assert len(await s.list_latest("", "", 100)) == 9


async def test_changes_append_their_nodes_event_in_their_own_transaction(open_store: Factory) -> None:
    """PostgreSQL: a put and a delete append their CANVAS_CHANGED event themselves (one transaction,
    one WAL flush); a refused put appends nothing. SQLite leaves it to the registry (another file)."""
    s = await open_store()
    if not s.records_events:
        assert isinstance(s, SqliteCanvasBackend)
        return
    assert isinstance(s, PgCanvasStore)
    first = await s.put("notes/a", "text/plain", b"one", "", "op")
    with pytest.raises(FlynnError):
        await s.put("notes/a", "text/plain", b"two", '"v9-stale"', "op")  # refused: etag
    await s.delete("notes/a", first.etag)
    async with s.db.connection() as c:
        cur = await c.execute("SELECT seq, type, reason, artifact_name FROM events ORDER BY seq")
        rows = await cur.fetchall()
        head = await (await c.execute("SELECT seq FROM event_head")).fetchone()
    changed = nodes_pb2.NODE_EVENT_TYPE_CANVAS_CHANGED
    assert [tuple(r[1:]) for r in rows] == [(changed, "put", "notes/a"), (changed, "delete", "notes/a")]
    assert head is not None and head[0] == rows[-1][0]


def test_prefix_end() -> None:
    assert prefix_end("docs/") == "docs0"
    assert prefix_end("a") == "b"
    assert prefix_end("") == ""
    assert prefix_end("a\U0010ffff") == "b"
    assert prefix_end("\U0010ffff") == ""
    assert prefix_end("x\ud7ff") == "x\ue000"


async def test_limits_and_version_window(open_store: Factory, tmp_path: Path, database_url: str) -> None:
    s = await open_store(max_artifact_bytes=100, max_total_bytes=250, max_versions=3)
    with pytest.raises(FlynnError) as ei:
        await s.put("big", "text/plain", b"x" * 101, "", "op")
    assert ei.value.code == Code.INVALID_ARGUMENT and ei.value.violations[0].field == "content"
    for i in range(10):  # only the last 3 versions are kept, so rewriting never fills the canvas
        await s.put("a", "text/plain", bytes([i]) * 80, "", "op")
    assert s.total_bytes == 240
    with pytest.raises(FlynnError) as ei:
        await s.get("a", 7)
    assert ei.value.code == Code.NOT_FOUND
    assert (await s.get("a", 8))[0].version == 8
    if not database_url:
        blobs = list((tmp_path / "canvas" / "blobs").rglob("*.bin"))
        assert len(blobs) == 3
    with pytest.raises(FlynnError) as ei:
        await s.put("b", "text/plain", b"y" * 20, "", "op")
    assert ei.value.code == Code.RESOURCE_EXHAUSTED and ei.value.reason == "CANVAS_FULL"
    # A reopened store (another replica, a restart) knows the total from the database.
    again = await open_store(max_artifact_bytes=100, max_total_bytes=250, max_versions=3)
    assert again.total_bytes == 240


def test_restart_removes_leftovers_and_keeps_committed(tmp_path: Path) -> None:
    root = tmp_path / "canvas"
    s = store(root)
    m = s.put("a", "application/json", b'{"k": 1}', "", "op")
    s.close()
    sub = next(p for p in (root / "blobs").iterdir() if p.is_dir())
    (sub / ".half.bin.123.tmp").write_bytes(b"half")  # an interrupted write
    (sub / "deadbeef-1.bin").write_bytes(b"orphan")  # renamed but never committed
    s2 = CanvasStore(root)
    rec = s2.recover()
    assert rec == {"temp_files_removed": 1, "orphan_blobs_removed": 1, "missing_blobs": 0}
    meta, content = s2.get("a")
    assert content == b'{"k": 1}' and meta.etag == m.etag and meta.sha256 == m.sha256
    assert s2.total_bytes == len(content)
