"""Client side of flynn.v1.Voice for other services (the gateway's inbound voice notes)."""

from __future__ import annotations

from collections.abc import Callable

import grpc
from flynn.v1 import common_pb2, voice_pb2, voice_pb2_grpc

from voice_svc.inbound import TranscriptionFailure

_DOWN = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
}


class VoiceTranscriber:
    """Transcriber (voice_svc.inbound) calling Voice.Transcribe over `channel()` (e.g. runtime.channel("voice"))."""

    def __init__(self, channel: Callable[[], grpc.aio.Channel]) -> None:
        self._channel = channel

    async def transcribe(self, audio: common_pb2.Audio, language_code: str, deadline: float) -> str:
        stub = voice_pb2_grpc.VoiceStub(self._channel())
        req = voice_pb2.TranscribeRequest(
            audio_content=audio.content,
            config=voice_pb2.RecognitionConfig(
                encoding=audio.encoding,
                sample_rate_hertz=audio.sample_rate_hertz,
                language_code=language_code,
            ),
        )
        try:
            resp = await stub.Transcribe(req, timeout=deadline)
        except grpc.aio.AioRpcError as e:
            code = e.code()
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise TranscriptionFailure("unreadable_audio", e.details() or "") from None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise TranscriptionFailure("timeout", e.details() or "") from None
            if code in _DOWN:
                raise TranscriptionFailure("voice_unavailable", f"{code.name}: {e.details()}") from None
            raise TranscriptionFailure("engine_error", f"{code.name}: {e.details()}") from None
        return resp.transcript
