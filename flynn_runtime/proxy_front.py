"""A PROXY protocol (v1 and v2) front for a gRPC server: gRPC's Python server cannot read the header
a TCP load balancer prepends, so a service started with `--proxy-protocol-listen` accepts such
connections on that port, reads the header (proxyprotocol library) — **only from a trusted proxy**;
any other peer is disconnected —, and pipes the rest of the connection to its own gRPC port on
loopback. The loopback source address of each piped connection maps to the client address from the
header (auth.PROXIED_CLIENTS), which Authenticator.client_address uses before X-Forwarded-For.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from proxyprotocol.detect import ProxyProtocolDetect
from proxyprotocol.reader import ProxyProtocolReader

from flynn_runtime.auth import PROXIED_CLIENTS, IPNetwork, address_in

log = logging.getLogger(__name__)

HEADER_TIMEOUT = 3.0
CHUNK = 64 * 1024
MAX_CONNECTIONS = 4096


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


class ProxyFront:
    def __init__(self, listen: str, target: str, trusted: Sequence[IPNetwork]) -> None:
        self._listen = listen
        self._target_host, _, port = target.rpartition(":")
        self._target_port = int(port)
        self._trusted = tuple(trusted)
        self._reader = ProxyProtocolReader(ProxyProtocolDetect())
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> None:
        host, _, port = self._listen.rpartition(":")
        self._server = await asyncio.start_server(self._serve, host.strip("[]") or None, int(port))
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("PROXY protocol front", extra={"listen": f"{host}:{self.port}"})

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._open):
            t.cancel()
        self._open.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        direct = str(peer[0]) if peer else ""
        if not address_in(direct, self._trusted) or len(self._open) >= MAX_CONNECTIONS:
            log.warning("PROXY protocol connection refused: not a trusted proxy", extra={"peer": direct})
            writer.close()
            return
        try:
            result = await asyncio.wait_for(self._reader.read(reader), HEADER_TIMEOUT)
        except Exception as e:  # noqa: BLE001 - a bad or missing header ends the connection
            log.warning("bad PROXY protocol header", extra={"peer": direct, "error": type(e).__name__})
            writer.close()
            return
        client = direct
        source = getattr(result, "source", None) if result.proxied else None
        if isinstance(source, tuple) and source:
            client = str(source[0])  # IPv4Address / IPv6Address
        try:
            up_reader, up_writer = await asyncio.open_connection(self._target_host, self._target_port)
        except OSError:
            writer.close()
            return
        local = up_writer.get_extra_info("sockname")
        key = f"{local[0]}:{local[1]}"
        PROXIED_CLIENTS[key] = client
        task = asyncio.current_task()
        if task is not None:
            self._open.add(task)
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            PROXIED_CLIENTS.pop(key, None)
            if task is not None:
                self._open.discard(task)
