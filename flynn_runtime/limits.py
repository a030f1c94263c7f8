"""Limits on concurrent calls that no caller can exceed, authenticated or not.

Three layers, all set per process (flynn_runtime.settings; defaults below):

- `streams_per_connection` (`--max-streams-per-connection`, default 1000 on the gateway, 10000 on
  internal services, whose one connection from the gateway multiplexes every caller's streams):
  HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS. A client opening more on one connection waits for a free
  stream.
- `total_calls` (`--max-total-calls`, default 10000): calls in progress on the server, all
  connections together. One more is answered RESOURCE_EXHAUSTED / TOO_MANY_CALLS at once.
- `public_streams` (`--max-public-streams`, default 100): streams that need no token — health Watch
  and server reflection. One more is answered RESOURCE_EXHAUSTED / TOO_MANY_PUBLIC_STREAMS.

`reflection_requires_token` (`--reflection-requires-token`, default false; the chart sets it on the
gateway) makes reflection need an operator or service token.

Voice notes: `audio_seconds` (`--max-audio-seconds`, default 300) is the longest audio the gateway
and the voice service accept, refused from the container header before decoding; `audio_decoders`
(`--audio-decoders`, default 2) is how many ffmpeg decodes the voice service runs at once (a request
waiting over 1 s for one is answered RESOURCE_EXHAUSTED / DECODERS_BUSY).
"""

from __future__ import annotations

from dataclasses import dataclass

from flynn_runtime import errors
from flynn_runtime.audio_probe import DEFAULT_MAX_SECONDS

REFLECTION_PREFIXES = (
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
PUBLIC_STREAM_METHODS = ("/grpc.health.v1.Health/Watch",)
# Method whose policy reflection borrows when it needs a token (operators and services may call it).
REFLECTION_POLICY_METHOD = "/flynn.v1.System/GetStatus"


@dataclass(frozen=True)
class Limits:
    streams_per_connection: int = 1000
    total_calls: int = 10_000
    public_streams: int = 100
    reflection_requires_token: bool = False
    # Voice notes (gateway SendMessage, voice Transcribe): longest accepted audio, and ffmpeg decodes at once.
    audio_seconds: int = DEFAULT_MAX_SECONDS
    audio_decoders: int = 2


def is_reflection(method: str) -> bool:
    return method.startswith(REFLECTION_PREFIXES)


def is_public_stream(method: str) -> bool:
    return method in PUBLIC_STREAM_METHODS or is_reflection(method)


class CallLimiter:
    """Counts calls in progress (the event loop is single-threaded: plain integers suffice)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.calls = 0
        self.public = 0
        self.refused = 0

    def acquire(self, public: bool) -> None:
        if self.calls >= self.limits.total_calls:
            self.refused += 1
            raise errors.resource_exhausted(
                f"the server has {self.calls} calls in progress, its limit; retry later",
                reason="TOO_MANY_CALLS",
                retry_after=1.0,
            )
        if public and self.public >= self.limits.public_streams:
            self.refused += 1
            raise errors.resource_exhausted(
                f"{self.public} unauthenticated health Watch / reflection streams are open, the limit; "
                "retry later or use health Check",
                reason="TOO_MANY_PUBLIC_STREAMS",
                retry_after=1.0,
            )
        self.calls += 1
        if public:
            self.public += 1

    def release(self, public: bool) -> None:
        self.calls -= 1
        if public:
            self.public -= 1
