"""Failed-auth limits replayed through the real gateway: random-token Nodes/Connect floods from one
address, then from many (X-Forwarded-For through the gateway's trusted proxy), while a real node
reconnects with its valid token every second: every one of its reconnects succeeds. A local mesh
can't be locked out either: calls without a token and with wrong tokens from 127.0.0.1 leave the
operator's own valid token working."""

from __future__ import annotations

import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterator

import grpc
from flynn.v1 import nodes_pb2, nodes_pb2_grpc, system_pb2, system_pb2_grpc

from flynn_runtime.audit import read_audit
from tests.security.conftest import SecureMesh, bearer

RECONNECTS = 6  # one a second while each flood runs


def _requests(first: nodes_pb2.ConnectRequest, done: threading.Event) -> Iterator[nodes_pb2.ConnectRequest]:
    yield first
    done.wait(10)


def connect_once(
    ch: grpc.Channel, node_id: str, token: str, metadata: tuple[tuple[str, str], ...] = ()
) -> str:
    """One Connect: 'registered' or the status code name it was refused with."""
    done = threading.Event()
    reg = nodes_pb2.ConnectRequest(
        register=nodes_pb2.NodeRegister(node_id=node_id, token=token, role="desktop", protocol_version=1)
    )
    call = nodes_pb2_grpc.NodesStub(ch).Connect(_requests(reg, done), metadata=metadata, timeout=10)
    try:
        first = next(call)
        return "registered" if first.HasField("registered") else first.WhichOneof("message") or "?"
    except grpc.RpcError as err:
        return str(err.code().name)
    finally:
        done.set()
        call.cancel()


def flood(ch: grpc.Channel, stop: threading.Event, many_addresses: bool, out: Counter[str]) -> None:
    i = 0
    while not stop.is_set() and i < 2000:  # bounded
        i += 1
        md: tuple[tuple[str, str], ...] = ()
        if many_addresses:
            md = (("x-forwarded-for", f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}"),)
        node_id = "real-node" if i % 2 else f"guess-{i}"  # half claim the real node's id
        out[connect_once(ch, node_id, f"nt_{secrets.token_urlsafe(24)}", md)] += 1
        time.sleep(0.01)


def reconnect_during_flood(
    mesh: SecureMesh, token: str, many_addresses: bool
) -> tuple[list[str], Counter[str]]:
    floods: Counter[str] = Counter()
    results: list[str] = []
    stop = threading.Event()
    with mesh.channel() as flood_ch, mesh.channel() as node_ch:
        workers = [
            threading.Thread(target=flood, args=(flood_ch, stop, many_addresses, floods)) for _ in range(2)
        ]
        for w in workers:
            w.start()
        try:
            time.sleep(1.0)  # the flood is under way before the first reconnect
            for _ in range(RECONNECTS):
                results.append(connect_once(node_ch, "real-node", token))
                time.sleep(1.0)
        finally:
            stop.set()
            for w in workers:
                w.join(30)
    return results, floods


def _node_token(mesh: SecureMesh) -> str:
    with mesh.channel() as ch:
        resp = nodes_pb2_grpc.NodesStub(ch).IssueNodeToken(
            nodes_pb2.IssueNodeTokenRequest(node_id="real-node", role="desktop"),
            metadata=mesh.tokens.md("operator"),
            timeout=10,
        )
    return str(resp.token)


def test_connect_floods_never_lock_out_a_real_node(secure_mesh: SecureMesh) -> None:
    token = _node_token(secure_mesh)
    one, one_floods = reconnect_during_flood(secure_mesh, token, many_addresses=False)
    assert one == ["registered"] * RECONNECTS, (one, one_floods)
    # the flood itself got nowhere, and past the limit it was told to back off
    assert "registered" not in one_floods
    assert one_floods["RESOURCE_EXHAUSTED"] > 0, one_floods
    many, many_floods = reconnect_during_flood(secure_mesh, token, many_addresses=True)
    assert many == ["registered"] * RECONNECTS, (many, many_floods)
    assert "registered" not in many_floods and many_floods["UNAUTHENTICATED"] > 0, many_floods
    # the nodes service saw the real client addresses the gateway passed on, not the gateway's
    refused = [
        e
        for e in read_audit(secure_mesh.root / "nodes" / "audit" / "nodes.jsonl")
        if e["event"] == "nodeRegisterRefused"
    ]
    peers = {e["peer"] for e in refused}
    assert "127.0.0.1" in peers and len({p for p in peers if p.startswith("10.")}) > 10, sorted(peers)[:20]


def test_a_local_mesh_cannot_be_locked_out(secure_mesh: SecureMesh) -> None:
    with secure_mesh.channel() as ch:
        system = system_pb2_grpc.SystemStub(ch)
        codes: Counter[str] = Counter()
        for i in range(30):
            for md in ((), bearer(f"flt_wrong{i}")):
                try:
                    system.GetStatus(system_pb2.GetStatusRequest(), metadata=md, timeout=10)
                except grpc.RpcError as err:
                    codes[err.code().name] += 1
        assert codes["UNAUTHENTICATED"] >= 30 and codes["RESOURCE_EXHAUSTED"] > 0, codes
        status = system.GetStatus(
            system_pb2.GetStatusRequest(), metadata=secure_mesh.tokens.md("operator"), timeout=10
        )
        assert status.services
