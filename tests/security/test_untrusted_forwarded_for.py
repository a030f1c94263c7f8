"""Without trusted proxies (the default), a caller's X-Forwarded-For is not believed: a real gateway
in front of a real config service reports the TCP peer, and wrong tokens sent with rotating
X-Forwarded-For values are all counted against that one address."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from flynn.v1 import principals_pb2, principals_pb2_grpc

from tests.support.mesh import ServiceProcess, free_port, make_tokens


@pytest.fixture(scope="module")
def plain_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    root = Path(tmp_path_factory.mktemp("plaingw"))
    tokens = make_tokens(root)
    config = ServiceProcess("config", "config_svc.main", root / "config", tokens).start(timeout=60)
    dead = f"127.0.0.1:{free_port()}"
    addresses = {"config": config.address, "queue": dead, "reactions": dead, "nodes": dead, "voice": dead}
    gateway = ServiceProcess("gateway", "gateway.main", root / "gateway", tokens, addresses=addresses)
    try:
        gateway.start(timeout=60)
        yield gateway.address, tokens.operator
    finally:
        gateway.stop()
        config.stop()


def test_forwarded_for_from_an_untrusted_peer_is_ignored(plain_gateway: tuple[str, str]) -> None:
    address, operator = plain_gateway
    with grpc.insecure_channel(address) as ch:
        pr = principals_pb2_grpc.PrincipalsStub(ch)
        md = (("authorization", f"Bearer {operator}"), ("x-forwarded-for", "203.0.113.5"))
        assert (
            pr.WhoAmI(principals_pb2.WhoAmIRequest(), metadata=md, timeout=10).client_address == "127.0.0.1"
        )
        codes: Counter[str] = Counter()
        for i in range(25):  # a guesser can't spread its failures over made-up addresses
            bad = (("authorization", f"Bearer flt_guess{i}"), ("x-forwarded-for", f"10.1.1.{i}"))
            try:
                pr.WhoAmI(principals_pb2.WhoAmIRequest(), metadata=bad, timeout=10)
            except grpc.RpcError as err:
                codes[err.code().name] += 1
        assert codes["RESOURCE_EXHAUSTED"] > 0 and codes["UNAUTHENTICATED"] == 20, codes
        # and the operator's valid token still works from that same, rate-limited address
        assert (
            pr.WhoAmI(principals_pb2.WhoAmIRequest(), metadata=md[:1], timeout=10).principal.name
            == "operator"
        )
