"""The PROXY protocol through the gateway's second listener: a load balancer (here a relay that
prepends a v1 or v2 header) in front of the gateway; the mesh sees the client address from the
header, and only from a trusted proxy."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
from flynn.v1 import principals_pb2, principals_pb2_grpc
from proxyprotocol.result import ProxyResultIPv4
from proxyprotocol.v2 import ProxyProtocolV2

from flynn_runtime.auth import parse_networks
from flynn_runtime.proxy_front import ProxyFront
from tests.security.conftest import SecureMesh
from tests.support.mesh import free_port


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@contextmanager
def load_balancer(target_port: int, header: bytes) -> Iterator[int]:
    """A TCP relay on a free port that prepends `header` to every connection it forwards."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = int(listener.getsockname()[1])
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", target_port))
            up.sendall(header)
            threading.Thread(target=_pipe, args=(conn, up), daemon=True).start()
            threading.Thread(target=_pipe, args=(up, conn), daemon=True).start()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield port
    finally:
        stop.set()
        listener.close()
        t.join(5)


def whoami(port: int, token: str) -> str:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        resp = principals_pb2_grpc.PrincipalsStub(ch).WhoAmI(
            principals_pb2.WhoAmIRequest(), metadata=(("authorization", f"Bearer {token}"),), timeout=10
        )
    return str(resp.client_address)


def test_proxy_protocol_v1_and_v2_name_the_client(secure_mesh: SecureMesh) -> None:
    v1 = b"PROXY TCP4 198.51.100.20 10.0.0.1 51234 443\r\n"
    with load_balancer(secure_mesh.proxy_port, v1) as port:
        assert whoami(port, secure_mesh.tokens.operator) == "198.51.100.20"
    result = ProxyResultIPv4(
        (ipaddress.IPv4Address("203.0.113.77"), 40000), (ipaddress.IPv4Address("10.0.0.1"), 443)
    )
    v2 = bytes(ProxyProtocolV2().pack(result))
    with load_balancer(secure_mesh.proxy_port, v2) as port:
        assert whoami(port, secure_mesh.tokens.operator) == "203.0.113.77"
    # the ordinary port is unchanged
    assert whoami(int(secure_mesh.gateway.rsplit(":", 1)[1]), secure_mesh.tokens.operator) == "127.0.0.1"


def test_proxy_protocol_only_from_trusted_proxies() -> None:
    async def scenario() -> bytes:
        target = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        target_port = target.sockets[0].getsockname()[1]
        front = ProxyFront(f"127.0.0.1:{free_port()}", f"127.0.0.1:{target_port}", parse_networks("10.9.9.9"))
        await front.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", front.port)
            writer.write(b"PROXY TCP4 198.51.100.20 10.0.0.1 51234 443\r\n")
            await writer.drain()
            try:  # closed at once: 127.0.0.1 is not trusted
                data = await asyncio.wait_for(reader.read(), 5)
            except ConnectionResetError:
                data = b""
            writer.close()
            return data
        finally:
            await front.stop()
            target.close()

    assert asyncio.run(scenario()) == b""
