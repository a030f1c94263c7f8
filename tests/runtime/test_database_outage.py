"""PostgreSQL crashes (`pg_ctl stop -m immediate`) under load and comes back: the config and nodes
processes go NOT_SERVING within a few seconds, answer UNAVAILABLE / DATABASE_UNAVAILABLE meanwhile,
return to SERVING by themselves, and every acknowledged revision and canvas put is there afterwards."""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path

import grpc
from flynn.v1 import canvas_pb2, canvas_pb2_grpc, config_pb2, config_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flynn_launcher.local_postgres import LocalPostgres
from flynn_runtime.rich_status import from_rpc_error
from tests.support.config import field_update
from tests.support.mesh import ServiceProcess, Tokens
from tests.support.nodes import config_yaml as nodes_yaml
from tests.support.nodes import nodes_config

NOT_SERVING_WITHIN = 6.0
SERVING_AGAIN_WITHIN = 20.0


async def _status(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as ch:
        try:
            r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
            return int(r.status)
        except grpc.aio.AioRpcError:
            return -1


async def _wait_status(addresses: list[str], want: int, within: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < within:
        if all([await _status(a) == want for a in addresses]):
            return time.monotonic() - start
        await asyncio.sleep(0.1)
    raise AssertionError(
        f"{addresses} not {health_pb2.HealthCheckResponse.ServingStatus.Name(want)} in {within} s"
    )


async def test_postgres_crash_under_load(
    tmp_path: Path, tokens: Tokens, postgres: LocalPostgres, postgres_url: str
) -> None:
    nodes_cfg = tmp_path / "nodes.yaml"
    nodes_cfg.write_text(nodes_yaml(nodes_config()))
    db = ["--database-url", postgres_url]
    config = ServiceProcess("config", "config_svc.main", tmp_path / "config", tokens, extra=db)
    nodes = ServiceProcess(
        "nodes", "nodes_svc.main", tmp_path / "nodes", tokens, extra=[*db, "--nodes-config", str(nodes_cfg)]
    )
    config.start()
    nodes.start()
    md = tokens.md("operator")
    acked_revisions: dict[int, int] = {}  # revision -> server.queue.cap committed
    acked_puts: dict[tuple[str, int], str] = {}  # (name, version) -> sha256
    outage_errors: list[tuple[str, str]] = []  # (code, reason) seen while the database was down
    stop = asyncio.Event()
    down = asyncio.Event()
    try:
        async with (
            grpc.aio.insecure_channel(config.address) as cch,
            grpc.aio.insecure_channel(nodes.address) as nch,
        ):
            cfg_stub = config_pb2_grpc.ConfigServiceStub(cch)
            canvas = canvas_pb2_grpc.CanvasStub(nch)

            async def note(e: grpc.aio.AioRpcError, started_down: bool) -> None:
                rich = from_rpc_error(e)
                if started_down or down.is_set():
                    outage_errors.append((e.code().name, rich.reason if rich else ""))
                else:
                    raise AssertionError(f"failed while the database was up: {e.code()} {e.details()}")
                await asyncio.sleep(0.05)

            async def config_load() -> None:
                i = 0
                while not stop.is_set():
                    i += 1
                    cap = 10 + i % 50
                    started_down = down.is_set()
                    try:
                        head = (
                            await cfg_stub.GetConfig(config_pb2.GetConfigRequest(), metadata=md, timeout=6)
                        ).revision
                        r = await cfg_stub.UpdateConfig(
                            field_update("server.queue.cap", cap, head=head, reason=f"load {i}"),
                            metadata=md,
                            timeout=6,
                        )
                    except grpc.aio.AioRpcError as e:
                        await note(e, started_down)
                        continue
                    if not r.unchanged:
                        acked_revisions[r.revision] = cap

            async def canvas_load(worker: int) -> None:
                i = 0
                while not stop.is_set():
                    i += 1
                    body = hashlib.sha256(f"{worker}/{i}".encode()).digest() * 2048  # 64 KiB
                    name = f"load/{worker}/{i % 7}"
                    started_down = down.is_set()
                    try:
                        r = await canvas.PutArtifact(
                            canvas_pb2.PutArtifactRequest(
                                name=name, content_type="application/octet-stream", content=body
                            ),
                            metadata=md,
                            timeout=6,
                        )
                    except grpc.aio.AioRpcError as e:
                        await note(e, started_down)
                        continue
                    assert r.artifact.sha256 == hashlib.sha256(body).hexdigest()
                    acked_puts[(name, r.artifact.version)] = r.artifact.sha256

            load = [asyncio.create_task(config_load())] + [
                asyncio.create_task(canvas_load(w)) for w in range(2)
            ]
            await asyncio.sleep(1.5)
            assert acked_revisions and acked_puts, "no load before the crash"
            before = (len(acked_revisions), len(acked_puts))

            down.set()
            await asyncio.to_thread(postgres.kill)  # pg_ctl stop -m immediate: a crash, recovery on start
            took = await _wait_status(
                [config.address, nodes.address],
                health_pb2.HealthCheckResponse.NOT_SERVING,
                NOT_SERVING_WITHIN,
            )
            print(f"NOT_SERVING {took:.2f} s after the crash")
            # A read that needs the database answers UNAVAILABLE / DATABASE_UNAVAILABLE, naming it.
            # (Calls of the load may instead wait out a short outage: a call waits up to 3 s for a
            # connection, so some succeed once the database is back.)
            for call in (
                cfg_stub.GetConfig(config_pb2.GetConfigRequest(revision=1), metadata=md, timeout=10),
                canvas.GetArtifact(canvas_pb2.GetArtifactRequest(name="load/0/1"), metadata=md, timeout=10),
            ):
                try:
                    await call
                    raise AssertionError("a read succeeded while the database was down")
                except grpc.aio.AioRpcError as e:
                    rich = from_rpc_error(e)
                    assert e.code() == grpc.StatusCode.UNAVAILABLE, e
                    assert rich is not None and rich.reason == "DATABASE_UNAVAILABLE", e
                    assert "127.0.0.1" in rich.metadata["database"] and postgres.password not in e.details()

            await asyncio.to_thread(postgres.start)
            took = await _wait_status(
                [config.address, nodes.address], health_pb2.HealthCheckResponse.SERVING, SERVING_AGAIN_WITHIN
            )
            print(f"SERVING again {took:.2f} s after the restart")
            down.clear()
            after_restart = (len(acked_revisions), len(acked_puts))
            for _ in range(150):  # calls succeed again (the pools replaced their connections)
                if len(acked_revisions) >= after_restart[0] + 3 and len(acked_puts) >= after_restart[1] + 3:
                    break
                await asyncio.sleep(0.1)
            stop.set()
            await asyncio.gather(*load)
            assert len(acked_revisions) > before[0] and len(acked_puts) > before[1]

            # Whatever the load saw fail during the outage was UNAVAILABLE (retryable), nothing else.
            assert all(code == "UNAVAILABLE" for code, _ in outage_errors), outage_errors

            # Every acknowledged revision and artifact version is there, with its content.
            for rev, cap in sorted(acked_revisions.items()):
                r = await cfg_stub.GetConfig(
                    config_pb2.GetConfigRequest(revision=rev), metadata=md, timeout=5
                )
                assert r.revision == rev and r.config.server.queue.cap == cap, rev
            listed = await cfg_stub.ListRevisions(
                config_pb2.ListRevisionsRequest(page_size=1), metadata=md, timeout=5
            )
            revisions = [x.revision for x in listed.revisions]
            assert revisions and revisions[0] >= max(acked_revisions)
            current: dict[str, int] = {}
            for name, version in acked_puts:
                current[name] = max(current.get(name, 0), version)
            for (name, version), sha in acked_puts.items():
                if version <= current[name] - 20:  # outside the kept-versions window (max_versions 20)
                    continue
                r = await canvas.GetArtifact(
                    canvas_pb2.GetArtifactRequest(name=name, version=version), metadata=md, timeout=5
                )
                assert hashlib.sha256(r.artifact.content).hexdigest() == sha and r.artifact.sha256 == sha
    finally:
        stop.set()
        config.stop()
        nodes.stop()
    print(
        f"acked {len(acked_revisions)} revisions and {len(acked_puts)} puts; {len(outage_errors)} calls refused"
    )
