"""A small real backend for the gateway tests: serves flynn.v1.Voice and flynn.v1.Nodes/Connect.

It lets the forwarding tests run against a real process without depending on the real services:

- Voice/Synthesize: echoes the text as audio_content; "sleep:<seconds>" sleeps first (recording
  "started"/"finished"/"cancelled" lines in <data-dir>/events.log); "" is INVALID_ARGUMENT naming `text`.
  `engine` reports the deadline the backend saw ("deadline=<seconds>" or "deadline=none").
- Voice/ListVoices: one VoiceInfo per request metadata entry (name "md:<key>=<value>").
- Voice/StreamSynthesize: "n:<k>" streams k chunks; "forever" streams one chunk, then waits until
  the process stops (ends with UNAVAILABLE/SHUTTING_DOWN).
- Voice/Transcribe: raw client stream (counts the messages and bytes) for a gateway built with a
  client-stream route (no proto method is client-streaming yet).
- Nodes/Connect: raw bidi echo.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from flynn.v1 import voice_pb2
from grpc.aio import ServicerContext

from flynn_runtime import settings
from flynn_runtime.errors import invalid_argument
from flynn_runtime.server import Runtime, ServiceApp, run_service

Ctx = ServicerContext[Any, Any]


class EchoBackendApp(ServiceApp):
    service_names = ("flynn.v1.Voice", "flynn.v1.Nodes")

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        self.events = Path(runtime.settings.data_dir) / "events.log"

    def _event(self, line: str) -> None:
        with self.events.open("a") as f:
            f.write(line + "\n")

    async def synthesize(
        self, request: voice_pb2.SynthesizeRequest, context: Ctx
    ) -> voice_pb2.SynthesizeResponse:
        if not request.text:
            raise invalid_argument("text", "is required")
        remaining = context.time_remaining()
        engine = "deadline=none" if remaining is None else f"deadline={remaining:.6f}"
        if request.text.startswith("sleep:"):
            self._event(f"started {request.text}")
            try:
                await asyncio.sleep(float(request.text.split(":", 1)[1]))
            except asyncio.CancelledError:
                self._event(f"cancelled {request.text}")
                raise
            self._event(f"finished {request.text}")
        return voice_pb2.SynthesizeResponse(audio_content=request.text.encode(), engine=engine)

    async def list_voices(
        self, request: voice_pb2.ListVoicesRequest, context: Ctx
    ) -> voice_pb2.ListVoicesResponse:
        out = voice_pb2.ListVoicesResponse()
        for key, value in context.invocation_metadata() or ():
            shown = value if isinstance(value, str) else value.hex()
            out.voices.add(name=f"md:{key}={shown}", engine="echo")
        return out

    async def stream_synthesize(
        self, request: voice_pb2.StreamSynthesizeRequest, context: Ctx
    ) -> AsyncIterator[voice_pb2.StreamSynthesizeResponse]:
        if request.text == "forever":
            yield voice_pb2.StreamSynthesizeResponse(text="0", sample_rate_hertz=16000)
            self._event("stream open")
            await self.runtime.stopping.wait()
            raise self.runtime.shutting_down_error()
        count = int(request.text.split(":", 1)[1]) if request.text.startswith("n:") else 1
        for i in range(count):
            yield voice_pb2.StreamSynthesizeResponse(text=str(i), audio_content=bytes([i % 256]) * 10)

    async def transcribe_stream(self, requests: AsyncIterator[bytes], context: Ctx) -> bytes:
        n = size = 0
        async for chunk in requests:
            n += 1
            size += len(chunk)
        return voice_pb2.TranscribeResponse(transcript=f"{n} messages, {size} bytes").SerializeToString()

    async def connect(self, requests: AsyncIterator[bytes], context: Ctx) -> AsyncIterator[bytes]:
        async for chunk in requests:
            yield chunk

    def register(self, server: grpc.aio.Server) -> None:
        voice = {
            "Synthesize": grpc.unary_unary_rpc_method_handler(
                self.synthesize,
                request_deserializer=voice_pb2.SynthesizeRequest.FromString,
                response_serializer=voice_pb2.SynthesizeResponse.SerializeToString,
            ),
            "ListVoices": grpc.unary_unary_rpc_method_handler(
                self.list_voices,
                request_deserializer=voice_pb2.ListVoicesRequest.FromString,
                response_serializer=voice_pb2.ListVoicesResponse.SerializeToString,
            ),
            "StreamSynthesize": grpc.unary_stream_rpc_method_handler(
                self.stream_synthesize,
                request_deserializer=voice_pb2.StreamSynthesizeRequest.FromString,
                response_serializer=voice_pb2.StreamSynthesizeResponse.SerializeToString,
            ),
            "Transcribe": grpc.stream_unary_rpc_method_handler(self.transcribe_stream),
        }
        nodes = {"Connect": grpc.stream_stream_rpc_method_handler(self.connect)}
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler("flynn.v1.Voice", voice),
                grpc.method_handlers_generic_handler("flynn.v1.Nodes", nodes),
            )
        )


def main() -> None:
    run_service(settings.parse("voice"), EchoBackendApp)


if __name__ == "__main__":
    main()
