"""The nodes process (real ServiceProcess): SIGTERM tells nodes to come back, SIGKILL + restart resumes them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
from flynn.v1 import nodes_pb2, nodes_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from examples.companion_node import CompanionNode
from tests.support.mesh import ServiceProcess, Tokens
from tests.support.nodes import config_yaml, eventually, nodes_config, started, stop_all


async def _metrics(proc: ServiceProcess) -> dict[str, float]:
    port = int((proc.data_dir / ".nodes.port").read_text().split()[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
    raw = (await reader.read()).decode()
    writer.close()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(raw.split("\r\n\r\n", 1)[1]):
        for s in fam.samples:
            key = s.name + (
                "{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}" if s.labels else ""
            )
            out[key] = s.value
    return out


async def test_sigterm_then_sigkill_nodes_come_back_to_one_registration(
    tmp_path: Path, tokens: Tokens, database_url: str
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    cfg_file = tmp_path / "nodes.yaml"
    cfg_file.write_text(config_yaml(nodes_config(heartbeat_s=0.5, lease_s=3)))
    db = ["--database-url", database_url] if database_url else []
    proc = ServiceProcess(
        "nodes", "nodes_svc.main", data, tokens, extra=["--nodes-config", str(cfg_file), *db]
    )
    proc.start()
    md = tokens.md("operator")
    pairs = []
    try:
        async with grpc.aio.insecure_channel(proc.address) as ch:
            stub = nodes_pb2_grpc.NodesStub(ch)
            for i in range(3):
                tok = await stub.IssueNodeToken(
                    nodes_pb2.IssueNodeTokenRequest(node_id=f"d{i}", role="desktop"), metadata=md, timeout=10
                )
                n = CompanionNode(
                    proc.address, f"d{i}", tok.token, "desktop", backoff_initial=0.05, backoff_max=0.5
                )
                pairs.append((n, await started(n)))
            m = await _metrics(proc)
            assert m["nodes_online"] == 3
            assert m["nodes_registrations_total{reason=new,result=ok}"] == 3
            watch = stub.WatchNodeEvents(
                nodes_pb2.WatchNodeEventsRequest(after_seq=0), metadata=md, timeout=60
            )

            async def drain() -> grpc.StatusCode:
                try:
                    async for _ in watch:
                        pass
                except grpc.aio.AioRpcError as e:
                    return e.code()
                return grpc.StatusCode.OK

            drained = asyncio.create_task(drain())
            assert await asyncio.to_thread(proc.terminate) == 0  # the nodes' loop keeps running meanwhile
            # The event watcher was told to reconnect rather than left hanging.
            assert await asyncio.wait_for(drained, 10) == grpc.StatusCode.UNAVAILABLE
            assert proc.log_path is not None
            log_text = proc.log_path.read_text()
            assert '"level": "error"' not in log_text and "Traceback" not in log_text, proc.log_tail()
        for n, _ in pairs:
            await eventually(lambda n=n: bool(n.stats.closes), what="NodeClose")
            assert [c.reason for c in n.stats.closes] == ["shutdown"] and n.stats.closes[0].reconnect
        await asyncio.to_thread(proc.start)  # same port: the nodes reconnect by themselves
        for n, _ in pairs:
            await eventually(lambda n=n: n.epoch == 2 and n.registered.is_set(), what="resumed after SIGTERM")
        await asyncio.to_thread(proc.kill9)
        await asyncio.to_thread(proc.start)
        for n, _ in pairs:
            await eventually(lambda n=n: n.epoch == 3 and n.registered.is_set(), what="resumed after SIGKILL")
        async with grpc.aio.insecure_channel(proc.address) as ch:
            stub = nodes_pb2_grpc.NodesStub(ch)
            listed = (await stub.ListNodes(nodes_pb2.ListNodesRequest(), metadata=md, timeout=10)).nodes
            assert [(x.node_id, x.epoch, x.reconnect_count, x.status) for x in listed] == [
                (f"d{i}", 3, 2, nodes_pb2.NODE_STATUS_ONLINE) for i in range(3)
            ]
            m = await _metrics(proc)
            assert m["nodes_reconnects_total{reason=resumed,result=success}"] == 3
            # The SIGKILL left the nodes marked online; the restart recorded why they went offline.
            events = stub.WatchNodeEvents(
                nodes_pb2.WatchNodeEventsRequest(after_seq=0), metadata=md, timeout=10
            )
            seen = []
            async for e in events:
                seen.append((e.event.type, e.event.reason))
                if len(seen) == 15:
                    break
            events.cancel()
            reasons = [r for t, r in seen if t == nodes_pb2.NODE_EVENT_TYPE_DISCONNECTED]
            assert reasons.count("shutdown") == 3 and reasons.count("server_restart") == 3
    finally:
        await stop_all(pairs)
        proc.stop()
