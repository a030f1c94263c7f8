"""The revision store on both backends: append-only, compare-and-set under concurrent callers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from config_svc.revision_store import SCHEMA, RevisionStore, StaleHead
from config_svc.revision_store_pg import MIGRATIONS, PgRevisionStore
from config_svc.revision_store_sqlite import SqliteRevisionStore
from tests.support.postgres import Databases


@pytest.fixture
async def store(tmp_path: Path, database_url: str, databases: Databases) -> AsyncIterator[RevisionStore]:
    if not database_url:
        s: RevisionStore = SqliteRevisionStore(tmp_path / "config.db")
        yield s
        await s.close()
        return
    yield PgRevisionStore(
        await databases.open(database_url, service="config", schema=SCHEMA, migrations=MIGRATIONS)
    )


async def test_append_get_range_and_pages(store: RevisionStore) -> None:
    assert await store.head() == 0
    for i in range(5):
        s = await store.append(2, "op", f"r{i}", [("a.b", "1", str(i))], f"cfg{i}".encode(), expected_head=i)
        assert s.revision == i + 1
    assert await store.head() == 5
    got = await store.get(3)
    assert got is not None and got.config == b"cfg2" and got.diff == [("a.b", "1", "2")]
    assert [r.revision for r in await store.range(1, 4)] == [2, 3, 4]
    assert [r.revision for r in await store.newest_first(0, 2)] == [5, 4]
    assert [r.revision for r in await store.newest_first(4, 10)] == [3, 2, 1]
    assert await store.get(99) is None


async def test_stale_head_is_refused(store: RevisionStore) -> None:
    await store.append(1, "system", "seed", [], b"x", expected_head=0)
    with pytest.raises(StaleHead) as e:
        await store.append(2, "op", "late", [], b"y", expected_head=0)
    assert e.value.head == 1
    assert await store.head() == 1


async def test_concurrent_compare_and_set_has_one_winner_per_head(store: RevisionStore) -> None:
    """Twenty callers race on each head: exactly one wins, revisions stay gapless and append-only."""
    for head in range(5):
        results = await asyncio.gather(
            *(
                store.append(2, f"op{i}", "race", [], f"{head}/{i}".encode(), expected_head=head)
                for i in range(20)
            ),
            return_exceptions=True,
        )
        wins = [r for r in results if not isinstance(r, BaseException)]
        assert len(wins) == 1, results
        assert all(isinstance(r, StaleHead) for r in results if isinstance(r, BaseException))
    revs = await store.range(0, 100)
    assert [r.revision for r in revs] == [1, 2, 3, 4, 5]


async def test_unconditional_appends_from_concurrent_callers_never_reuse_a_revision(
    store: RevisionStore,
) -> None:
    results = await asyncio.gather(*(store.append(2, "op", "free", [], bytes([i])) for i in range(30)))
    assert sorted(r.revision for r in results) == list(range(1, 31))
    assert await store.head() == 30
