"""Principals with two config replicas (real processes) on one real PostgreSQL, and a nodes service
(another process) that follows the principals through replica B only: a token issued through A
authenticates through B and at the nodes service; revoked through A, its open streams on B and on
the nodes service end with UNAUTHENTICATED (TOKEN_REVOKED) within a second. Both replicas run a 30 s
safety poll, so only the NOTIFY wake-up can meet that bound. Then every config replica is replaced
by a new process with an empty data dir: the principals and revocations are still there. And a
principals file left in a data dir by an earlier release is merged into the database at start."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from flynn.v1 import (
    config_pb2,
    config_pb2_grpc,
    nodes_pb2,
    nodes_pb2_grpc,
    principals_pb2,
    principals_pb2_grpc,
)

from config_svc.principal_store_sqlite import SqlitePrincipalStore
from flynn_runtime.auth import Role, hash_token
from flynn_runtime.channels import client_channel
from flynn_runtime.rich_status import from_rpc_error
from tests.support.config import until_credential_pushed
from tests.support.mesh import ServiceProcess, Tokens

OPERATOR = principals_pb2.PRINCIPAL_ROLE_OPERATOR
CHANNEL = principals_pb2.PRINCIPAL_ROLE_CHANNEL
POLL = ["--revision-poll-seconds", "30"]
OPERATOR_ROLE = Role.OPERATOR


def config_replica(root: Path, name: str, tokens: Tokens, url: str) -> ServiceProcess:
    return ServiceProcess(
        "config", "config_svc.main", root / f"config-{name}", tokens, extra=["--database-url", url, *POLL]
    )


@dataclass
class Mesh:
    a: ServiceProcess
    b: ServiceProcess
    nodes: ServiceProcess


@pytest.fixture
def mesh(tmp_path: Path, tokens: Tokens, postgres_url: str) -> Iterator[Mesh]:
    a = config_replica(tmp_path, "a", tokens, postgres_url)
    b = config_replica(tmp_path, "b", tokens, postgres_url)
    started: list[ServiceProcess] = []
    try:
        for p in (a, b):
            started.append(p.start())
        # Follows config (and so the principals) through replica B only.
        nodes = ServiceProcess(
            "nodes", "nodes_svc.main", tmp_path / "nodes", tokens, addresses={"config": b.address}
        )
        started.append(nodes.start())
        yield Mesh(a, b, nodes)
    finally:
        for p in reversed(started):
            p.stop()


def principals(ch: grpc.aio.Channel) -> principals_pb2_grpc.PrincipalsStub:
    return principals_pb2_grpc.PrincipalsStub(ch)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def until_accepted(call: Callable[[], Awaitable[object]], within: float = 5.0) -> float:
    """Retry an authenticated unary call until it stops answering UNAUTHENTICATED; returns seconds."""
    start = time.monotonic()
    while True:
        try:
            await call()
            return time.monotonic() - start
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.UNAUTHENTICATED or time.monotonic() - start > within:
                raise
        await asyncio.sleep(0.05)  # gently: every refusal counts in the failed-auth limiter


async def ended(call: grpc.aio.UnaryStreamCall[object, object]) -> tuple[grpc.StatusCode, str, float]:
    """Read a stream until it ends: its code, its reason and when."""
    try:
        while await call.read() is not grpc.aio.EOF:  # type: ignore[attr-defined]
            pass
    except grpc.aio.AioRpcError as e:
        rich = from_rpc_error(e)
        return e.code(), rich.reason if rich is not None else "", time.monotonic()
    return grpc.StatusCode.OK, "", time.monotonic()


async def test_issue_on_a_authenticates_on_b_and_revoke_on_a_cuts_streams_everywhere(
    mesh: Mesh, tokens: Tokens
) -> None:
    admin = tokens.md("operator")
    ch_a, ch_b = client_channel(mesh.a.address, ""), client_channel(mesh.b.address, "")
    ch_n = client_channel(mesh.nodes.address, "")
    # What B pushes to the services that follow it (as the nodes service does).
    pushed = principals(ch_b).WatchPrincipals(
        principals_pb2.WatchPrincipalsRequest(), metadata=bearer(tokens.for_service("queue")), timeout=60
    )
    try:
        await pushed.read()
        issued = await principals(ch_a).IssueToken(
            principals_pb2.IssueTokenRequest(name="pat", role=OPERATOR), metadata=admin, timeout=10
        )
        answered = time.monotonic()
        pat = bearer(issued.token)
        # Through B: the table is read for lists at once, and B's authenticator learns the token
        # from the NOTIFY wake-up within moments.
        listed = await principals(ch_b).ListPrincipals(
            principals_pb2.ListPrincipalsRequest(), metadata=admin, timeout=10
        )
        assert "pat" in {p.name for p in listed.principals}

        async def whoami_b() -> principals_pb2.WhoAmIResponse:
            return await principals(ch_b).WhoAmI(principals_pb2.WhoAmIRequest(), metadata=pat, timeout=5)

        # B applies a change to its own authenticator before it pushes it: once B's snapshot holds
        # the token, WhoAmI through B accepts it.
        await until_credential_pushed(pushed, issued.principal.fingerprint, within=5)
        waited = time.monotonic() - answered
        assert waited < 1.0, f"B knew the token {waited:.3f}s after the issue"
        me = await whoami_b()
        assert me.principal.name == "pat" and me.principal.source == "issued"
        assert me.principal.issued_by == "operator:operator"
        nodes = nodes_pb2_grpc.NodesStub(ch_n)
        await until_accepted(lambda: nodes.ListNodes(nodes_pb2.ListNodesRequest(), metadata=pat, timeout=5))

        # Streams held with pat's token: a config watch on B, a node-event watch on the nodes service.
        watch_b = config_pb2_grpc.ConfigServiceStub(ch_b).WatchConfig(
            config_pb2.WatchConfigRequest(), metadata=pat, timeout=60
        )
        await watch_b.read()  # the snapshot: the stream is open
        watch_n = nodes.WatchNodeEvents(nodes_pb2.WatchNodeEventsRequest(), metadata=pat, timeout=60)
        await asyncio.sleep(0.3)  # both streams are past authentication
        endings = [asyncio.create_task(ended(watch_b)), asyncio.create_task(ended(watch_n))]
        await asyncio.sleep(0.1)
        assert not any(t.done() for t in endings)

        sent = time.monotonic()
        revoked = await principals(ch_a).RevokeToken(
            principals_pb2.RevokeTokenRequest(name="pat", reason="left"), metadata=admin, timeout=10
        )
        answered = time.monotonic()
        assert [p.name for p in revoked.revoked] == ["pat"]
        async with asyncio.timeout(10):
            results = await asyncio.gather(*endings)
        for where, (code, reason, at) in zip(("config B", "nodes via B"), results, strict=True):
            assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_REVOKED"), (where, code, reason)
            took = at - answered
            assert took <= 1.0, f"the stream on {where} ended {took:.3f}s after the revocation"
            print(f"{where}: ended {at - sent:.3f}s after the revoke was sent, {took:.3f}s after its answer")
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await whoami_b()
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        pushed.cancel()
        for ch in (ch_a, ch_b, ch_n):
            await ch.close()


async def test_principals_survive_replacing_every_config_replica(
    tmp_path: Path, tokens: Tokens, postgres_url: str
) -> None:
    admin = tokens.md("operator")
    first = [config_replica(tmp_path, n, tokens, postgres_url) for n in ("a", "b")]
    try:
        for p in first:
            p.start()
        ch_a, ch_b = client_channel(first[0].address, ""), client_channel(first[1].address, "")
        try:
            keep = await principals(ch_a).IssueToken(
                principals_pb2.IssueTokenRequest(name="keep", role=OPERATOR), metadata=admin, timeout=10
            )
            drop = await principals(ch_a).IssueToken(
                principals_pb2.IssueTokenRequest(name="drop", role=CHANNEL, channels=["web"]),
                metadata=admin,
                timeout=10,
            )
            # Revoked through the other replica: an issued principal and one of the tokens file.
            for name in ("drop", "channel"):
                await principals(ch_b).RevokeToken(
                    principals_pb2.RevokeTokenRequest(name=name), metadata=admin, timeout=10
                )
        finally:
            await ch_a.close()
            await ch_b.close()
    finally:
        for p in first:
            p.stop()

    # New processes with new, empty data dirs: nothing can come from a local file.
    again = [config_replica(tmp_path, n, tokens, postgres_url) for n in ("c", "d")]
    try:
        for p in again:
            p.start()
        for p in again:
            ch = client_channel(p.address, "")
            try:
                me = await principals(ch).WhoAmI(
                    principals_pb2.WhoAmIRequest(), metadata=bearer(keep.token), timeout=5
                )  # at once: a replica loads the principals before it serves
                assert me.principal.name == "keep" and me.principal.source == "issued"
                for token in (drop.token, tokens.channel):
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await principals(ch).WhoAmI(principals_pb2.WhoAmIRequest(), metadata=bearer(token))
                    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                listed = await principals(ch).ListPrincipals(
                    principals_pb2.ListPrincipalsRequest(include_revoked=True), metadata=admin, timeout=5
                )
                state = {(x.name, x.source): x.revoked for x in listed.principals}
                assert state[("keep", "issued")] is False and state[("drop", "issued")] is True
                assert state[("channel", "file")] is True
            finally:
                await ch.close()
        assert not (again[0].data_dir / "config" / "principals.db").exists()
    finally:
        for p in again:
            p.stop()


async def test_a_leftover_principals_file_is_merged_at_start(
    tmp_path: Path, tokens: Tokens, postgres_url: str
) -> None:
    """A data dir from a release that kept principals in SQLite even with a database (flynn-dev up
    --postgres keeps its data dir): they are merged into the database, so nothing issued is lost and,
    above all, nothing revoked comes back."""
    proc = config_replica(tmp_path, "old", tokens, postgres_url)
    old = SqlitePrincipalStore(proc.data_dir / "config" / "principals.db")
    _, legacy = await old.issue("legacy", OPERATOR_ROLE, [], "operator:operator")
    await old.revoke_file_hash(hash_token(tokens.channel), "channel", "operator:operator")
    await old.close()
    proc.start()
    try:
        ch = client_channel(proc.address, "")
        try:
            me = await principals(ch).WhoAmI(
                principals_pb2.WhoAmIRequest(), metadata=bearer(legacy), timeout=5
            )
            assert me.principal.name == "legacy"
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await principals(ch).WhoAmI(principals_pb2.WhoAmIRequest(), metadata=bearer(tokens.channel))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            await ch.close()
        assert (proc.data_dir / "config" / "principals.db.adopted").exists()
    finally:
        proc.stop()
