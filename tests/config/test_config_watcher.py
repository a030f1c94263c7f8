"""ConfigWatcher: last-known-good on disk, cold start while the config service is down, resume by itself."""

from __future__ import annotations

import asyncio
from pathlib import Path

from flynn.v1 import config_pb2, config_pb2_grpc
from google.protobuf import field_mask_pb2

from flynn_runtime import config_yaml, metrics
from flynn_runtime.channels import client_channel
from flynn_runtime.config_watcher import ConfigWatcher, read_cache, write_cache
from flynn_runtime.server import Runtime
from tests.support.config import client_settings, config_server, field_update
from tests.support.mesh import Tokens, free_port


async def _update(address: str, token: str, values: dict[str, object]) -> int:
    ch = client_channel(address, token)
    try:
        stub = config_pb2_grpc.ConfigServiceStub(ch)
        head = (await stub.GetConfig(config_pb2.GetConfigRequest())).revision
        resp = await stub.UpdateConfig(
            config_pb2.UpdateConfigRequest(
                config=config_yaml.dict_to_config(values),
                update_mask=field_mask_pb2.FieldMask(paths=list(values)),
                expected_revision=head,
                reason="test",
            )
        )
        return int(resp.revision)
    finally:
        await ch.close()


def test_cache_file_round_trip_and_damage(tmp_path: Path) -> None:
    cfg = config_yaml.dict_to_config({"server.queue.mode": "steer"})
    path = tmp_path / "c" / "queue.bin"
    write_cache(path, 7, cfg.SerializeToString())
    assert read_cache(path) == (7, cfg)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert read_cache(path) is None
    assert read_cache(tmp_path / "missing.bin") is None
    assert not list(path.parent.glob("*.tmp"))


async def test_cold_start_while_config_is_down_then_resume(tmp_path: Path, tokens: Tokens) -> None:
    port = free_port()
    addr = f"127.0.0.1:{port}"
    cfg_dir, svc_dir = tmp_path / "config-svc", tmp_path / "queue"
    # 1. A first life of the service learns revision 2 and persists it.
    async with config_server(cfg_dir, tokens, listen=addr, bookmark_seconds=0.3):
        rt = Runtime(client_settings("queue", svc_dir, tokens, addr))
        w = ConfigWatcher(rt)
        await w.start()
        rev = await _update(addr, tokens.operator, {"server.queue.mode": "interrupt"})
        assert await w.wait_for_revision(rev, 10)
        await w.stop()
        await rt.close()
    assert read_cache(svc_dir / "config-cache" / "queue.bin") is not None

    # 2. The config service is down: a new instance starts at once on the persisted config.
    rt = Runtime(client_settings("queue", svc_dir, tokens, addr))
    w = ConfigWatcher(rt, backoff_initial=0.05, backoff_max=0.3)
    changes: list[int] = []
    w.subscribe(lambda old, new, r: changes.append(r), key="server.queue.mode")
    await asyncio.wait_for(w.start(), 2)
    try:
        assert w.revision == rev and w.config.server.queue.mode == config_pb2.QUEUE_MODE_INTERRUPT
        assert metrics.CONFIG_APPLIED_REVISION._value.get() == rev
        await asyncio.sleep(0.5)
        assert not w.connected and w.staleness() >= 0.4
        # 3. The config service comes back (same port, same data): the watcher resumes by itself.
        async with config_server(cfg_dir, tokens, listen=addr, bookmark_seconds=0.3):
            for _ in range(300):
                if w.connected:
                    break
                await asyncio.sleep(0.02)
            assert w.connected
            rev2 = await _update(addr, tokens.operator, {"server.queue.mode": "followup"})
            assert await w.wait_for_revision(rev2, 10)
            assert w.config.server.queue.mode == config_pb2.QUEUE_MODE_FOLLOWUP
            assert changes[-1] == rev2
            await asyncio.sleep(0.7)
            assert w.staleness() < 0.6  # bookmarks keep it fresh
    finally:
        await w.stop()
        await rt.close()
    assert read_cache(svc_dir / "config-cache" / "queue.bin") == (rev2, w.config)


async def test_start_with_no_cache_and_no_server_does_not_block(tmp_path: Path, tokens: Tokens) -> None:
    rt = Runtime(client_settings("voice", tmp_path / "voice", tokens, f"127.0.0.1:{free_port()}"))
    w = ConfigWatcher(rt)
    await asyncio.wait_for(w.start(), 1)
    assert w.revision == 0 and w.config == config_pb2.FlynnConfig()
    await w.stop()
    await rt.close()


async def test_config_watchers_apply_every_rapid_change_in_order(tmp_path: Path, tokens: Tokens) -> None:
    async with config_server(tmp_path / "cfg", tokens, bookmark_seconds=0.5) as srv:
        runtimes = [
            Runtime(client_settings(f"s{i}", tmp_path / f"s{i}", tokens, srv.address)) for i in range(3)
        ]
        watchers = [ConfigWatcher(rt) for rt in runtimes]
        seen: list[list[int]] = [[] for _ in watchers]
        for i, w in enumerate(watchers):
            w.subscribe(lambda old, new, rev, i=i: seen[i].append(rev), key="server.queue.cap")
            await w.start()
        for w in watchers:
            assert await w.wait_for_revision(1, 10)
        ch = client_channel(srv.address, tokens.operator)
        stub = config_pb2_grpc.ConfigServiceStub(ch)
        rev = 1
        for i in range(100):
            resp = await stub.UpdateConfig(field_update("server.queue.cap", 500 + i, head=rev))
            rev = resp.revision
        for w in watchers:
            assert await w.wait_for_revision(101, 20)
            assert w.config.server.queue.cap == 599
        assert all(s == list(range(1, 102)) for s in seen), seen  # the seed, then every change once
        await ch.close()
        for w in watchers:
            await w.stop()
        for rt in runtimes:
            await rt.close()
