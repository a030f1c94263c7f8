"""Synthesizer backed by flynn.v1.Voice/Synthesize on the voice service."""

from __future__ import annotations

from collections.abc import Callable

import grpc
from flynn.v1 import common_pb2, voice_pb2, voice_pb2_grpc

from flynn_runtime.rich_status import from_rpc_error
from queue_svc.speech import SpeechFailure, SpeechRequest

_UNAVAILABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.PERMISSION_DENIED}  # fmt: skip


class VoiceSynthesizer:
    def __init__(self, channel: Callable[[], grpc.aio.Channel | None]) -> None:
        self._channel = channel

    async def synthesize(self, request: SpeechRequest) -> common_pb2.Audio:
        ch = self._channel()
        if ch is None:
            raise SpeechFailure("voice_unavailable", "no voice address")
        stub = voice_pb2_grpc.VoiceStub(ch)
        req = voice_pb2.SynthesizeRequest(
            text=request.text[:5000],
            voice=voice_pb2.VoiceSelection(name=request.voice),
            audio_config=voice_pb2.AudioConfig(encoding=request.encoding),
            engines=list(request.engines),
        )
        try:
            resp = await stub.Synthesize(req, timeout=request.timeout)
        except grpc.aio.AioRpcError as e:
            code = e.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise SpeechFailure("timeout", e.details() or "") from None
            rich = from_rpc_error(e)
            if rich is not None and rich.reason == "ALL_ENGINES_FAILED":
                # The voice service answered: every engine failed. Name the engines' cause, not the service.
                cause = rich.metadata.get("cause", "engine_error")
                reason = "timeout" if cause == "timeout" else "engine_error"
                raise SpeechFailure(reason, e.details() or "") from None
            if code in _UNAVAILABLE:
                raise SpeechFailure("voice_unavailable", f"{code.name}: {e.details()}") from None
            raise SpeechFailure("engine_error", f"{code.name}: {e.details()}") from None
        return common_pb2.Audio(
            encoding=resp.encoding,
            sample_rate_hertz=resp.sample_rate_hertz,
            content=resp.audio_content,
            duration_ms=resp.duration_ms,
            voice=resp.engine,
        )
