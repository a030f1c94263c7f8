"""One shared channel per backend for the forwarding hop.

The hop forwards the caller's own authorization header, so these channels carry no token of their
own (and no client interceptor on the hot path); they use mutual TLS when a mesh CA is configured. Connect attempts are bounded so a backend that is
down fails a call with UNAVAILABLE in about a second instead of hanging; there are no gRPC-level
retries (the caller decides, guided by RetryInfo).
"""

from __future__ import annotations

from typing import Any

import grpc

from flynn_runtime import tls
from flynn_runtime.auth import hop_metadata
from flynn_runtime.channels import KEEPALIVE_OPTIONS, balancing_options, open_channel
from flynn_runtime.settings import Settings

CONNECT_TIMEOUT_MS = 1000


def backend_options(max_message_bytes: int, address: str = "") -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.enable_retries", 0),
        # The minimum reconnect backoff is also gRPC's minimum connect timeout.
        ("grpc.min_reconnect_backoff_ms", CONNECT_TIMEOUT_MS),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", CONNECT_TIMEOUT_MS),
        *KEEPALIVE_OPTIONS,
        # Several replicas of a backend (an address list or dns:///headless): spread the calls.
        *balancing_options(address),
    ]


class Backends:
    """Lazily opened channels, one per backend process, reused by every forwarded call."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._credentials = tls.channel_credentials(settings.tls)

    def hop_metadata(self) -> tuple[tuple[str, str], ...]:
        """Headers telling the backend the real client address of the call being served."""
        return hop_metadata(self._settings.service_token)

    def address(self, backend: str) -> str:
        return self._settings.address(backend)

    def deployed(self, backend: str) -> bool:
        return self._settings.deployed(backend)

    def channel(self, backend: str) -> grpc.aio.Channel:
        ch = self._channels.get(backend)
        if ch is None:
            ch = open_channel(
                self.address(backend),
                backend_options(self._settings.max_message_bytes, self.address(backend)),
                self._credentials,
            )
            self._channels[backend] = ch
        return ch

    def replica_channel(self, backend: str, address: str) -> grpc.aio.Channel:
        """A channel to one replica of a backend whose address setting lists several (kept)."""
        key = f"{backend}@{address}"
        ch = self._channels.get(key)
        if ch is None:
            ch = open_channel(
                address, backend_options(self._settings.max_message_bytes, address), self._credentials
            )
            self._channels[key] = ch
        return ch

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close(None)
        self._channels.clear()
