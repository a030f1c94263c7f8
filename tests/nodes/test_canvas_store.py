"""Canvas domain (nodes_svc/canvas_store.py) on real files: CAS, names, limits, versions, recovery."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from flynn_runtime.errors import Code, FlynnError
from nodes_svc.canvas_store import CanvasLimits, CanvasStore, name_problem, validate_name

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


def test_put_get_versions_and_cas(tmp_path: Path) -> None:
    s = store(tmp_path / "canvas")
    m1 = s.put("notes/a", "text/plain", b"one", "*", "op")
    assert m1.version == 1 and m1.sha256 == hashlib.sha256(b"one").hexdigest()
    with pytest.raises(FlynnError) as ei:
        s.put("notes/a", "text/plain", b"again", "*", "op")  # "*" only creates
    assert ei.value.code == Code.FAILED_PRECONDITION and ei.value.metadata["current_etag"] == m1.etag
    m2 = s.put("notes/a", "text/markdown", b"two", m1.etag, "op")
    with pytest.raises(FlynnError) as ei:
        s.put("notes/a", "text/plain", b"stale", m1.etag, "op")  # based on an old version
    assert ei.value.reason == "ETAG_MISMATCH" and ei.value.metadata["current_etag"] == m2.etag
    meta, content = s.get("notes/a")
    assert (meta.version, content, meta.content_type) == (2, b"two", "text/markdown")
    assert s.get("notes/a", 1)[1] == b"one"
    with pytest.raises(FlynnError) as ei:
        s.get("notes/a", 7)
    assert ei.value.code == Code.NOT_FOUND
    with pytest.raises(FlynnError):
        s.delete("notes/a", m1.etag)
    assert s.delete("notes/a", m2.etag) == 2
    with pytest.raises(FlynnError) as ei:
        s.get("notes/a")
    assert ei.value.code == Code.NOT_FOUND
    # Versions are never reused after a delete, so an old etag can never match again.
    m3 = s.put("notes/a", "text/plain", b"one", "*", "op")
    assert m3.version == 3 and m3.etag != m1.etag


def test_list_prefix_and_paging(tmp_path: Path) -> None:
    s = store(tmp_path / "canvas")
    for i in range(7):
        s.put(f"docs/{i}", "text/plain", b"x", "", "op")
    s.put("other", "text/plain", b"x", "", "op")
    page1 = s.list_latest("docs/", "", 3)
    assert [m.name for m in page1] == ["docs/0", "docs/1", "docs/2"]
    rest = s.list_latest("docs/", page1[-1].name, 100)
    assert [m.name for m in rest] == [f"docs/{i}" for i in range(3, 7)]


def test_limits_and_version_window(tmp_path: Path) -> None:
    s = store(tmp_path / "canvas", max_artifact_bytes=100, max_total_bytes=250, max_versions=3)
    with pytest.raises(FlynnError) as ei:
        s.put("big", "text/plain", b"x" * 101, "", "op")
    assert ei.value.code == Code.INVALID_ARGUMENT and ei.value.violations[0].field == "content"
    for i in range(10):  # only the last 3 versions are kept, so rewriting never fills the canvas
        s.put("a", "text/plain", bytes([i]) * 80, "", "op")
    assert s.total_bytes == 240
    with pytest.raises(FlynnError) as ei:
        s.get("a", 7)
    assert ei.value.code == Code.NOT_FOUND
    assert s.get("a", 8)[0].version == 8
    blobs = list((tmp_path / "canvas" / "blobs").rglob("*.bin"))
    assert len(blobs) == 3
    with pytest.raises(FlynnError) as ei:
        s.put("b", "text/plain", b"y" * 20, "", "op")
    assert ei.value.code == Code.RESOURCE_EXHAUSTED and ei.value.reason == "CANVAS_FULL"


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
