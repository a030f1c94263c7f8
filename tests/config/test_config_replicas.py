"""Two config replicas (real processes) on one real PostgreSQL: a revision committed through either
replica reaches the watchers of both, in order, without a gap; writes stay compare-and-set."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from flynn.v1 import config_pb2, config_pb2_grpc

from flynn_runtime.channels import client_channel
from flynn_runtime.rich_status import from_rpc_error
from tests.support.config import field_update
from tests.support.mesh import ServiceProcess, Tokens, all_started

Stub = config_pb2_grpc.ConfigServiceStub


@pytest.fixture
def replicas(tmp_path: Path, tokens: Tokens, postgres_url: str) -> Iterator[list[ServiceProcess]]:
    procs = [
        ServiceProcess(
            "config",
            "config_svc.main",
            tmp_path / f"config-{name}",
            tokens,
            # A long safety poll: the test shows NOTIFY wakes replica B, not the poll.
            extra=[
                "--bookmark-seconds",
                "0.5",
                "--database-url",
                postgres_url,
                "--revision-poll-seconds",
                "30",
            ],
        )
        for name in ("a", "b")
    ]
    with all_started(procs):
        yield procs


async def _update(op: Stub, expected: int, value: int) -> int:
    r = await op.UpdateConfig(
        field_update("server.queue.cap", value, head=expected, reason="replica test"), timeout=10
    )
    return int(r.revision)


async def _watch(stub: Stub, seen: list[int], caps: list[int], want: int) -> None:
    call = stub.WatchConfig(config_pb2.WatchConfigRequest(after_revision=0), timeout=30)
    async for resp in call:
        if resp.kind in (config_pb2.WATCH_EVENT_KIND_SNAPSHOT, config_pb2.WATCH_EVENT_KIND_CHANGE):
            seen.append(resp.revision)
            caps.append(resp.config.server.queue.cap)
            if resp.revision >= want:
                call.cancel()
                return


async def test_a_change_through_a_reaches_watchers_on_b_in_order(
    replicas: list[ServiceProcess], tokens: Tokens
) -> None:
    a, b = replicas
    ch_a, ch_b = client_channel(a.address, tokens.operator), client_channel(b.address, tokens.operator)
    op_a, op_b = Stub(ch_a), Stub(ch_b)
    try:
        start = int((await op_b.GetConfig(config_pb2.GetConfigRequest(), timeout=5)).revision)
        assert start == 1  # one seed, although both replicas started on the empty database
        changes = 20
        want = start + changes
        seen_b: list[list[int]] = [[] for _ in range(5)]
        caps_b: list[list[int]] = [[] for _ in range(5)]
        seen_a: list[int] = []
        caps_a: list[int] = []
        watches = [asyncio.create_task(_watch(op_b, seen_b[i], caps_b[i], want)) for i in range(5)]
        watches.append(asyncio.create_task(_watch(op_a, seen_a, caps_a, want)))
        await asyncio.sleep(0.3)  # every watch holds its snapshot
        # The first half goes through A only (B's watchers learn of it from NOTIFY alone: the safety
        # poll is 30 s, longer than the test's timeout), then writes alternate between the replicas.
        head = start
        for i in range(changes):
            op = op_a if i < changes // 2 or i % 2 == 0 else op_b
            for _ in range(50):  # the other replica's feed may lag by one wake-up: STALE is retried
                try:
                    head = await _update(op, head, 100 + i)
                    break
                except grpc.aio.AioRpcError as e:
                    assert from_rpc_error(e).reason == "STALE_REVISION", e
                    head = int((await op.GetConfig(config_pb2.GetConfigRequest(), timeout=5)).revision)
            else:
                pytest.fail("update never went through")
            if i == changes // 2 - 1:
                async with asyncio.timeout(5):
                    while min(len(s) for s in seen_b) < 1 or min(s[-1] for s in seen_b) < head:  # noqa: ASYNC110
                        await asyncio.sleep(0.01)
        async with asyncio.timeout(10):
            await asyncio.gather(*watches)
        for seen, caps in [*zip(seen_b, caps_b, strict=True), (seen_a, caps_a)]:
            first = seen[0]
            assert seen == list(range(first, want + 1)), seen  # in order, no gap, no duplicate
            assert caps[-1] == 100 + changes - 1
        # The history has exactly one revision per change.
        revs = await op_b.ListRevisions(config_pb2.ListRevisionsRequest(page_size=100), timeout=5)
        assert [r.revision for r in revs.revisions] == list(range(want, 0, -1))
    finally:
        await ch_a.close()
        await ch_b.close()


async def test_concurrent_writes_through_both_replicas_one_wins(
    replicas: list[ServiceProcess], tokens: Tokens
) -> None:
    a, b = replicas
    ch_a, ch_b = client_channel(a.address, tokens.operator), client_channel(b.address, tokens.operator)
    try:
        op_a, op_b = Stub(ch_a), Stub(ch_b)
        head = int((await op_a.GetConfig(config_pb2.GetConfigRequest(), timeout=5)).revision)
        results = await asyncio.gather(
            _update(op_a, head, 77), _update(op_b, head, 78), return_exceptions=True
        )
        ok = [r for r in results if isinstance(r, int)]
        failed = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert ok == [head + 1] and len(failed) == 1, results
        assert from_rpc_error(failed[0]).reason == "STALE_REVISION"
    finally:
        await ch_a.close()
        await ch_b.close()


async def test_list_watchers_through_any_replica_shows_every_replicas_watchers(
    replicas: list[ServiceProcess], tokens: Tokens
) -> None:
    a, b = replicas
    ch_a, ch_b = client_channel(a.address, tokens.operator), client_channel(b.address, tokens.operator)
    try:
        op_a, op_b = Stub(ch_a), Stub(ch_b)
        calls = {}
        for name, op in (("on-a", op_a), ("on-b", op_b)):
            call = op.WatchConfig(
                config_pb2.WatchConfigRequest(
                    identity=config_pb2.WatcherIdentity(service="probe", instance_id=name, version="t")
                ),
                timeout=30,
            )
            await call.read()  # the snapshot: the watch is registered
            calls[name] = call
        await op_b.ReportStatus(
            config_pb2.ReportStatusRequest(
                identity=config_pb2.WatcherIdentity(service="probe", instance_id="on-a"), applied_revision=1
            ),
            timeout=5,
        )

        async def listed(op: Stub) -> dict[str, tuple[bool, int]]:
            resp = await op.ListWatchers(config_pb2.ListWatchersRequest(page_size=100), timeout=5)
            return {
                w.identity.instance_id: (w.connected, w.applied_revision)
                for w in resp.watchers
                if w.identity.service == "probe"
            }

        want = {"on-a": (True, 1), "on-b": (True, 0)}
        async with asyncio.timeout(10):
            while await listed(op_a) != want or await listed(op_b) != want:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        calls["on-b"].cancel()
        # B syncs its registry's changes every second; the bound is generous for a loaded CI machine.
        async with asyncio.timeout(20):
            while (await listed(op_a)).get("on-b") != (False, 0):  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        calls["on-a"].cancel()
    finally:
        await ch_a.close()
        await ch_b.close()


async def test_rapid_commits_through_both_replicas_reach_every_watcher_in_order(
    replicas: list[ServiceProcess], tokens: Tokens
) -> None:
    """Two writers commit back to back, one through each replica; every watch on either replica (and
    one that joins midway with after_revision) sees every revision once, in order, without a gap,
    although a wake-up may find several new revisions at once."""
    a, b = replicas
    ch_a, ch_b = client_channel(a.address, tokens.operator), client_channel(b.address, tokens.operator)
    op_a, op_b = Stub(ch_a), Stub(ch_b)
    try:
        start = int((await op_a.GetConfig(config_pb2.GetConfigRequest(), timeout=5)).revision)
        per_writer = 15
        want = start + 2 * per_writer
        seen: list[list[int]] = [[] for _ in range(16)]
        caps: list[list[int]] = [[] for _ in range(16)]
        watches = [
            asyncio.create_task(_watch(op_a if i % 2 else op_b, seen[i], caps[i], want)) for i in range(16)
        ]
        await asyncio.sleep(0.3)  # every watch holds its snapshot

        async def writer(op: Stub, base: int) -> None:
            done = 0
            for _ in range(2000):  # bounded: each attempt either commits or loses a race
                if done == per_writer:
                    return
                head = int((await op.GetConfig(config_pb2.GetConfigRequest(), timeout=5)).revision)
                try:
                    await _update(op, head, base + done)
                    done += 1
                except grpc.aio.AioRpcError as e:
                    assert from_rpc_error(e).reason == "STALE_REVISION", e
            pytest.fail("a writer never finished")

        async def late_watch() -> list[int]:
            while int((await op_b.GetConfig(config_pb2.GetConfigRequest(), timeout=5)).revision) < start + 5:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
            got: list[int] = []
            call = op_b.WatchConfig(config_pb2.WatchConfigRequest(after_revision=start + 5), timeout=30)
            async for resp in call:
                if resp.kind == config_pb2.WATCH_EVENT_KIND_CHANGE:
                    got.append(resp.revision)
                    if resp.revision >= want:
                        call.cancel()
                        break
            return got

        late = asyncio.create_task(late_watch())
        await asyncio.gather(writer(op_a, 1000), writer(op_b, 2000))
        async with asyncio.timeout(15):
            await asyncio.gather(*watches)
            late_seen = await late
        for s in seen:
            assert s == list(range(s[0], want + 1)), s  # in order, no gap, no duplicate
        assert late_seen == list(range(start + 6, want + 1)), late_seen
        last_caps = {c[-1] for c in caps}
        assert len(last_caps) == 1 and last_caps <= {1000 + per_writer - 1, 2000 + per_writer - 1}
    finally:
        await ch_a.close()
        await ch_b.close()
