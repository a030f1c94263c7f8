"""ConfigService through a real in-process gRPC server (real SQLite under tmp_path)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from flynn.v1 import config_pb2, config_pb2_grpc
from google.protobuf import field_mask_pb2

from config_svc.watch_hub import WatchHub
from flynn_runtime import config_yaml
from flynn_runtime.channels import client_channel
from flynn_runtime.config_watcher import ConfigWatcher
from flynn_runtime.rich_status import from_rpc_error
from flynn_runtime.server import RunningServer, Runtime
from tests.support.config import client_settings
from tests.support.mesh import Tokens

Stub = config_pb2_grpc.ConfigServiceStub
KIND = config_pb2


def mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


async def head(op: Stub) -> int:
    return int((await op.GetConfig(config_pb2.GetConfigRequest())).revision)


async def set_values(
    op: Stub, values: dict[str, object], reason: str = "test", expected: int | None = None
) -> config_pb2.UpdateConfigResponse:
    cfg = config_yaml.dict_to_config(values)
    exp = expected if expected is not None else await head(op)
    return await op.UpdateConfig(
        config_pb2.UpdateConfigRequest(
            config=cfg, update_mask=mask(*values), expected_revision=exp, reason=reason
        )
    )


async def test_seeded_on_first_start(op: Stub) -> None:
    r = await op.GetConfig(config_pb2.GetConfigRequest())
    assert r.revision == 1 and r.metadata.kind == KIND.CONFIG_REVISION_KIND_SEED
    assert r.config.tts.enabled_channels == ["voice-demo"] and r.metadata.actor == "system"
    assert any(d.path == "server.queue.mode" for d in r.metadata.diff)


async def test_ten_watchers_see_a_hundred_rapid_changes_in_order(
    op: Stub, server: RunningServer, tokens: Tokens
) -> None:
    channels = [client_channel(server.address, tokens.service) for _ in range(2)]
    seen: list[list[tuple[int, int]]] = [[] for _ in range(10)]
    calls = []
    for i in range(10):
        call = Stub(channels[i % 2]).WatchConfig(
            config_pb2.WatchConfigRequest(
                identity=config_pb2.WatcherIdentity(service="t", instance_id=f"w{i}")
            )
        )
        calls.append(call)

    async def read(i: int) -> None:
        async for resp in calls[i]:
            if resp.kind != KIND.WATCH_EVENT_KIND_BOOKMARK:
                seen[i].append((resp.kind, resp.revision))
                assert resp.config.server.queue.cap == (resp.revision - 1 if resp.revision > 1 else 20)
            if resp.revision >= 101 and resp.kind != KIND.WATCH_EVENT_KIND_BOOKMARK:
                return

    readers = [asyncio.create_task(read(i)) for i in range(10)]
    # Every watcher has its snapshot before the burst starts.
    for _ in range(500):
        if all(s for s in seen):
            break
        await asyncio.sleep(0.01)
    rev = await head(op)
    for _ in range(100):
        resp = await set_values(op, {"server.queue.cap": rev}, expected=rev)
        assert resp.revision == rev + 1
        rev = resp.revision
    await asyncio.wait_for(asyncio.gather(*readers), 30)
    for s in seen:
        assert s[0] == (KIND.WATCH_EVENT_KIND_SNAPSHOT, 1)
        assert s[1:] == [(KIND.WATCH_EVENT_KIND_CHANGE, r) for r in range(2, 102)]
    for c in calls:
        c.cancel()
    for ch in channels:
        await ch.close()


async def test_reconnect_with_after_revision_gets_exactly_what_it_missed(
    op: Stub, tokens: Tokens, server: RunningServer
) -> None:
    for i in range(5):
        await set_values(op, {"server.queue.cap": 30 + i})  # revisions 2..6
    ch = client_channel(server.address, tokens.service)
    stub = Stub(ch)

    async def collect(after: int, until_bookmark: bool = True) -> list[tuple[int, int]]:
        out = []
        async for resp in stub.WatchConfig(config_pb2.WatchConfigRequest(after_revision=after)):
            out.append((resp.kind, resp.revision))
            if resp.kind == KIND.WATCH_EVENT_KIND_BOOKMARK:
                break
        return out

    got = await asyncio.wait_for(collect(3), 10)
    assert got[:-1] == [(KIND.WATCH_EVENT_KIND_CHANGE, r) for r in (4, 5, 6)]
    assert got[-1] == (KIND.WATCH_EVENT_KIND_BOOKMARK, 6)
    # A client holding the head gets no snapshot: only bookmarks until something changes.
    assert await asyncio.wait_for(collect(6), 10) == [(KIND.WATCH_EVENT_KIND_BOOKMARK, 6)]
    # A client with nothing gets the snapshot.
    assert (await asyncio.wait_for(collect(0), 10))[0] == (KIND.WATCH_EVENT_KIND_SNAPSHOT, 6)
    await ch.close()


async def test_stale_expected_revision_is_refused(op: Stub) -> None:
    await set_values(op, {"server.queue.mode": "interrupt"})  # head 2
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await set_values(op, {"server.queue.mode": "steer"}, expected=1)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    rich = from_rpc_error(e.value)
    assert rich is not None and rich.reason == "STALE_REVISION" and rich.metadata["current_revision"] == "2"
    assert await head(op) == 2


async def test_invalid_update_names_every_field_and_commits_nothing(op: Stub) -> None:
    cfg = config_yaml.dict_to_config(
        {
            "automation.reactions": [
                {
                    "id": "a",
                    "trigger": {"event": "message_received", "regex": "(x"},
                    "actions": [{"ack": {"emoji": "👀"}}],
                },
                {"id": "a", "trigger": {"event": "message_received"}, "actions": [{}]},
            ],
            "tts.rollout.basis_points": 20000,
            "server.nodes.allowed_roles": [""],
        }
    )
    cfg.server.queue.mode = 9  # type: ignore[assignment]
    req = config_pb2.UpdateConfigRequest(
        config=cfg,
        update_mask=mask(
            "automation.reactions",
            "tts.rollout",
            "server.nodes.allowed_roles",
            "server.queue.mode",
            "server.queue.nope",
        ),
        expected_revision=1,
        reason="bad",
    )
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await op.UpdateConfig(req)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    rich = from_rpc_error(e.value)
    assert rich is not None
    assert {v.field for v in rich.violations} == {
        "update_mask.paths[4]",
        "automation.reactions[0].trigger.regex",
        "automation.reactions[1].id",
        "automation.reactions[1].actions[0]",
        "tts.rollout.basis_points",
        "server.nodes.allowed_roles[0]",
        "server.queue.mode",
    }
    assert await head(op) == 1
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await op.UpdateConfig(config_pb2.UpdateConfigRequest(expected_revision=1))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    err = from_rpc_error(e.value)
    assert err is not None and "update_mask" in {v.field for v in err.violations}


async def test_dry_run_and_no_op(op: Stub) -> None:
    dry = await op.UpdateConfig(
        config_pb2.UpdateConfigRequest(
            config=config_yaml.dict_to_config({"audio.enabled": False}),
            update_mask=mask("audio.enabled"),
            expected_revision=1,
            dry_run=True,
        )
    )
    assert dry.dry_run and dry.revision == 1 and [d.path for d in dry.diff] == ["audio.enabled"]
    assert dry.config.audio.enabled is False and await head(op) == 1
    same = await set_values(op, {"audio.enabled": True})
    assert same.unchanged and same.revision == 1 and not same.diff and await head(op) == 1


async def test_rollback_is_a_new_revision_equal_to_the_old_one(op: Stub) -> None:
    original = (await op.GetConfig(config_pb2.GetConfigRequest())).config
    await set_values(op, {"server.queue.mode": "interrupt", "tts.enabled": False})
    await set_values(op, {"automation.reactions": []})
    r = await op.RollbackConfig(
        config_pb2.RollbackConfigRequest(to_revision=1, expected_revision=3, reason="revert")
    )
    assert r.revision == 4 and r.diff
    got = await op.GetConfig(config_pb2.GetConfigRequest(revision=4))
    assert got.config == original
    assert got.metadata.kind == KIND.CONFIG_REVISION_KIND_ROLLBACK and got.metadata.restored_revision == 1
    assert got.metadata.reason == "revert" and got.metadata.actor == "operator:operator"
    # The history is intact: revision 2 still reads as it was.
    assert (
        await op.GetConfig(config_pb2.GetConfigRequest(revision=2))
    ).config.server.queue.mode == KIND.QUEUE_MODE_INTERRUPT
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await op.RollbackConfig(config_pb2.RollbackConfigRequest(to_revision=99, reason="x"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


async def test_list_revisions_pages_newest_first(op: Stub) -> None:
    for i in range(6):
        await set_values(op, {"server.queue.cap": 40 + i})
    seen, token = [], ""
    for _ in range(10):
        page = await op.ListRevisions(config_pb2.ListRevisionsRequest(page_size=3, page_token=token))
        seen += [r.revision for r in page.revisions]
        token = page.next_page_token
        if not token:
            break
    assert seen == [7, 6, 5, 4, 3, 2, 1]
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await op.ListRevisions(config_pb2.ListRevisionsRequest(page_token="garbage"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_explain_sources(op: Stub) -> None:
    await set_values(
        op,
        {
            "server.queue.mode": "collect",
            "server.queue.overrides": {"sessions": {"tg:vip": "steer"}, "channels": {"slack": "followup"}},
            "server.queue.rollout": {"mode": "interrupt", "rollout": {"basis_points": 10000}},
            "tts.enabled": False,
            "tts.rollout": {"basis_points": 5000},
        },
    )

    async def explain(
        key: str, session: str = "", channel: str = "", node: str = ""
    ) -> config_pb2.ExplainConfigResponse:
        return await op.ExplainConfig(
            config_pb2.ExplainConfigRequest(key=key, session_key=session, channel=channel, node_id=node)
        )

    e = await explain("server.queue.mode", "tg:vip", "slack")
    assert (e.value, e.source) == ('"steer"', KIND.VALUE_SOURCE_SESSION_OVERRIDE)
    e = await explain("server.queue.mode", "slack:1", "slack")
    assert (e.value, e.source) == ('"followup"', KIND.VALUE_SOURCE_CHANNEL_OVERRIDE)
    e = await explain("server.queue.mode", "tg:2", "tg")
    assert (e.value, e.source) == ('"interrupt"', KIND.VALUE_SOURCE_ROLLOUT)
    assert e.hashed_key == "server.queue.mode/tg:2" and e.basis_points == 10000 and e.revision == 2
    e = await explain("tts.enabled", "tg:2", "telegram")
    assert (e.value, e.source) == ("false", KIND.VALUE_SOURCE_GLOBAL)  # channel not enabled
    e = await explain("server.nodes.enabled")
    assert (e.value, e.source) == ("true", KIND.VALUE_SOURCE_GLOBAL)
    e = await explain("server.agent.address")
    assert e.source == KIND.VALUE_SOURCE_DEFAULT
    e = await explain("automation.reactions.canvas-on-node-connect", "tg:2")
    assert e.source in (KIND.VALUE_SOURCE_ROLLOUT, KIND.VALUE_SOURCE_GLOBAL) and e.basis_points == 1000
    # tts.rollout at 50%: some session in and some out, each with its bucket.
    sources = set()
    for i in range(40):
        e = await explain("tts.enabled", f"v:{i}", "voice-demo")
        sources.add(e.source)
        assert e.hashed_key == f"tts.enabled/v:{i}" and (e.bucket < 5000) == (e.value == "true")
    assert sources == {KIND.VALUE_SOURCE_ROLLOUT, KIND.VALUE_SOURCE_GLOBAL}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await explain("no.such.key")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_nack_is_recorded_in_list_watchers(
    op: Stub, server: RunningServer, tokens: Tokens, tmp_path: Path
) -> None:
    def refuse_interrupt(cfg: config_pb2.FlynnConfig) -> None:
        if cfg.server.queue.mode == KIND.QUEUE_MODE_INTERRUPT:
            raise ValueError("interrupt mode is not supported by this build")

    runtime = Runtime(client_settings("queue", tmp_path / "queue", tokens, server.address))
    watcher = ConfigWatcher(runtime, validator=refuse_interrupt)
    await watcher.start()
    try:
        assert await watcher.wait_for_revision(1, 10)
        bad = await set_values(op, {"server.queue.mode": "interrupt"})
        entry = None
        for _ in range(500):
            ws = await op.ListWatchers(config_pb2.ListWatchersRequest())
            entry = next((w for w in ws.watchers if w.identity.service == "queue"), None)
            if entry is not None and entry.last_nack_revision == bad.revision:
                break
            await asyncio.sleep(0.02)
        assert entry is not None and entry.last_nack_revision == bad.revision
        assert "not supported" in entry.last_nack_reason
        assert entry.connected and entry.applied_revision == 1 and entry.identity.instance_id == "queue@queue"
        assert ws.head_revision == bad.revision
        assert watcher.revision == 1 and watcher.config.server.queue.mode == KIND.QUEUE_MODE_COLLECT
        # The next acceptable revision is applied and ACKed.
        good = await set_values(op, {"server.queue.mode": "steer"})
        assert await watcher.wait_for_revision(good.revision, 10)
        for _ in range(500):
            ws = await op.ListWatchers(config_pb2.ListWatchersRequest())
            if any(w.applied_revision == good.revision for w in ws.watchers):
                break
            await asyncio.sleep(0.02)
        assert any(w.applied_revision == good.revision for w in ws.watchers)
    finally:
        await watcher.stop()
        await runtime.close()


async def test_watch_hub_closes_a_watcher_that_falls_behind() -> None:
    hub = WatchHub(queue_size=3, bookmark_seconds=0.05)
    slow, fast = hub.subscribe(), hub.subscribe()
    for rev in range(1, 3):
        hub.publish(rev, b"x")
    assert await fast.next_batch(0) == [(1, b"x"), (2, b"x")]
    for rev in range(3, 6):
        hub.publish(rev, b"x")
    assert await slow.next_batch(0) == [] and slow.overflowed and not fast.overflowed
    assert [r for r, _ in await fast.next_batch(2) or []] == [3, 4, 5]
    assert await fast.next_batch(5) is None  # nothing new: the bookmark tick woke it
    hub.close()
    assert fast.closed
    await hub.aclose()


async def test_watch_hub_wakes_every_waiting_watch_once_per_revision() -> None:
    hub = WatchHub(queue_size=8, bookmark_seconds=30)
    subs = [hub.subscribe() for _ in range(50)]
    waits = [asyncio.create_task(s.next_batch(0)) for s in subs]
    await asyncio.sleep(0)
    waits[0].cancel()  # a watch that goes away leaves the others' wake-up alone
    hub.publish(1, b"one")
    got = await asyncio.gather(*waits[1:])
    assert got == [[(1, b"one")]] * 49
    # A revision missing from the log (older than it keeps) is left out; the servicer replays it.
    hub.publish(3, b"three")
    assert await subs[1].next_batch(1) == [(3, b"three")]
    await hub.aclose()


async def test_slow_watcher_is_closed_and_resumes_from_its_revision(tmp_path: Path, tokens: Tokens) -> None:
    from tests.support.config import config_server, write_seed

    # A large config (~300 KB per message) fills HTTP/2 flow-control windows quickly.
    rules = [
        {
            "id": f"r{i}",
            "description": "x" * 3000,
            "trigger": {"event": "message_received"},
            "actions": [{"ack": {"emoji": "👀"}}],
        }
        for i in range(100)
    ]
    seed = write_seed(tmp_path / "big.yaml", {"automation": {"reactions": rules}})
    async with config_server(
        tmp_path / "cfg", tokens, seed_file=seed, watch_queue_size=2, bookmark_seconds=30
    ) as srv:
        ch = client_channel(srv.address, tokens.operator)
        op = Stub(ch)
        watch_ch = client_channel(srv.address, tokens.service)
        call = Stub(watch_ch).WatchConfig(config_pb2.WatchConfigRequest())
        first = await call.read()
        assert first.kind == KIND.WATCH_EVENT_KIND_SNAPSHOT and first.revision == 1
        for i in range(60):  # the reader is paused: its queue overflows
            await set_values(op, {"server.queue.cap": i + 1})
        got: list[int] = []
        with pytest.raises(grpc.aio.AioRpcError) as e:
            while True:
                msg = await asyncio.wait_for(call.read(), 10)
                assert msg is not grpc.aio.EOF
                got.append(msg.revision)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        err = from_rpc_error(e.value)
        assert err is not None and err.reason == "WATCHER_TOO_SLOW"
        assert got == list(range(2, 2 + len(got))) and len(got) < 60
        # It resumes from what it holds and gets exactly the rest, in order.
        rest = []
        async for msg in Stub(watch_ch).WatchConfig(
            config_pb2.WatchConfigRequest(after_revision=got[-1] if got else 1)
        ):
            rest.append((msg.kind, msg.revision))
            if msg.revision == 61:
                break
        start = (got[-1] if got else 1) + 1
        assert rest == [(KIND.WATCH_EVENT_KIND_CHANGE, r) for r in range(start, 62)]
        await ch.close()
        await watch_ch.close()


async def test_a_masked_path_left_empty_is_cleared(op: Stub) -> None:
    r = await op.UpdateConfig(
        config_pb2.UpdateConfigRequest(
            config=config_pb2.FlynnConfig(),
            update_mask=mask("tts.engines", "server.nodes.feature_gates.ui.canvas"),
            expected_revision=1,
            reason="clear",
        )
    )
    changes = {d.path: (d.old_value, d.new_value) for d in r.diff}
    assert changes["tts.engines"] == ('["piper", "espeak-ng"]', "")
    assert changes["server.nodes.feature_gates.ui.canvas"] == ("true", "")
    got = (await op.GetConfig(config_pb2.GetConfigRequest())).config
    assert list(got.tts.engines) == [] and got.server.nodes.feature_gates.ui.canvas is False
    assert list(got.tts.enabled_channels) == ["voice-demo"]  # siblings untouched
