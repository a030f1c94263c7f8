"""flynn.v1.Voice: validate, call the chains, map results. Thin on purpose."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from flynn.v1 import common_pb2, voice_pb2, voice_pb2_grpc
from grpc.aio import ServicerContext

from flynn_runtime.server import Runtime, until_stopping
from flynn_runtime.validation import Violations
from voice_svc import metrics
from voice_svc.audio_codec import (
    MAX_RATE,
    MIN_RATE,
    DecoderPool,
    Pcm,
    encode,
    recognition_input,
    resample,
)
from voice_svc.engines import STT_ENGINES, TTS_ENGINES
from voice_svc.voice_chain import Attempt, SpeechRequest, SpokenSentence, VoiceChain

MAX_TEXT_CHARS = 5000
MAX_AUDIO_BYTES = 10 * 1024 * 1024
_ENCODINGS = (
    common_pb2.AUDIO_ENCODING_LINEAR16,
    common_pb2.AUDIO_ENCODING_OGG_OPUS,
    common_pb2.AUDIO_ENCODING_MP3,
)


def _attempts(items: Sequence[Attempt]) -> list[voice_pb2.EngineAttempt]:
    return [
        voice_pb2.EngineAttempt(
            engine=a.engine, ok=a.ok, cause=a.cause, detail=a.detail, elapsed_ms=a.elapsed_ms
        )
        for a in items
    ]


def _check_text(v: Violations, field: str, text: str) -> None:
    if not text.strip():
        v.add(field, "is required (1..5000 characters, not only spaces)")
    elif len(text) > MAX_TEXT_CHARS:
        v.add(field, f"is {len(text)} characters; at most {MAX_TEXT_CHARS} allowed")
    elif "\x00" in text:
        v.add(field, "must not contain NUL characters")
    elif not any(c.isalnum() for c in text):
        v.add(field, "has nothing to speak (no letters or digits)")


def _check_engines(v: Violations, field: str, names: Sequence[str], known: Sequence[str]) -> None:
    v.id_list(field, names, known, max_items=16)


def _check_rate(v: Violations, field: str, rate: int) -> None:
    if rate != 0 and not MIN_RATE <= rate <= MAX_RATE:
        v.add(field, f"must be 0 (natural rate) or {MIN_RATE}..{MAX_RATE}, got {rate}")


def _check_voice(v: Violations, voice: voice_pb2.VoiceSelection) -> None:
    v.text("voice.name", voice.name, max_bytes=256)
    v.text("voice.language_code", voice.language_code, max_bytes=35)


def _remaining(context: ServicerContext[Any, Any]) -> float | None:
    r = context.time_remaining()
    return None if r is None else float(r)


class VoiceServicer(voice_pb2_grpc.VoiceServicer):
    def __init__(self, runtime: Runtime, chain: VoiceChain) -> None:
        self.runtime = runtime
        self.chain = chain
        self.limits = runtime.settings.limits
        self.decoders = DecoderPool(self.limits.audio_decoders)

    async def Synthesize(
        self, request: voice_pb2.SynthesizeRequest, context: ServicerContext[Any, Any]
    ) -> voice_pb2.SynthesizeResponse:
        v = Violations()
        _check_text(v, "text", request.text)
        _check_voice(v, request.voice)
        cfg = request.audio_config
        if cfg.encoding not in (0, *_ENCODINGS):
            v.add("audio_config.encoding", f"unsupported encoding {cfg.encoding}")
        _check_rate(v, "audio_config.sample_rate_hertz", cfg.sample_rate_hertz)
        if cfg.encoding == common_pb2.AUDIO_ENCODING_OGG_OPUS and cfg.sample_rate_hertz not in (
            0,
            8000,
            12000,
            16000,
            24000,
            48000,
        ):
            v.add("audio_config.sample_rate_hertz", "OGG_OPUS supports 8000, 12000, 16000, 24000 or 48000")
        if cfg.speaking_rate != 0 and not 0.25 <= cfg.speaking_rate <= 4.0:
            v.add("audio_config.speaking_rate", f"must be 0 or 0.25..4, got {cfg.speaking_rate}")
        _check_engines(v, "engines", request.engines, TTS_ENGINES)
        if v:
            metrics.REQUESTS.labels("Synthesize", "invalid").inc()
        v.raise_if_any()
        try:
            result = await self.chain.synthesize(
                SpeechRequest(
                    request.text,
                    voice=request.voice.name,
                    language_code=request.voice.language_code,
                    speaking_rate=cfg.speaking_rate or 1.0,
                    engines=list(request.engines),
                    caller_remaining=_remaining(context),
                )
            )
        except Exception:
            metrics.REQUESTS.labels("Synthesize", "failed").inc()
            raise
        pcm = result.pcm
        if cfg.sample_rate_hertz:
            pcm = resample(pcm, cfg.sample_rate_hertz)
        encoding = cfg.encoding or common_pb2.AUDIO_ENCODING_LINEAR16
        content, rate = await encode(pcm, encoding)
        metrics.REQUESTS.labels("Synthesize", "ok").inc()
        return voice_pb2.SynthesizeResponse(
            audio_content=content,
            encoding=encoding,
            sample_rate_hertz=rate,
            duration_ms=int(pcm.duration_s * 1000),
            engine=result.engine,
            attempts=_attempts(result.attempts),
        )

    async def StreamSynthesize(
        self, request: voice_pb2.StreamSynthesizeRequest, context: ServicerContext[Any, Any]
    ) -> AsyncIterator[voice_pb2.StreamSynthesizeResponse]:
        v = Violations()
        _check_text(v, "text", request.text)
        _check_voice(v, request.voice)
        _check_rate(v, "sample_rate_hertz", request.sample_rate_hertz)
        _check_engines(v, "engines", request.engines, TTS_ENGINES)
        if v:
            metrics.REQUESTS.labels("StreamSynthesize", "invalid").inc()
        v.raise_if_any()

        source = self.chain.stream_synthesize(
            SpeechRequest(
                request.text,
                voice=request.voice.name,
                language_code=request.voice.language_code,
                engines=list(request.engines),
                caller_remaining=_remaining(context),
            )
        )
        first = True
        outcome = "failed"
        try:
            async for item in until_stopping(self.runtime, source):
                assert isinstance(item, SpokenSentence)
                pcm: Pcm = item.pcm
                if request.sample_rate_hertz:
                    pcm = resample(pcm, request.sample_rate_hertz)
                msg = voice_pb2.StreamSynthesizeResponse(audio_content=pcm.data, text=item.text)
                if first:
                    msg.sample_rate_hertz = pcm.sample_rate
                    msg.engine = item.engine
                    first = False
                yield msg
            outcome = "ok"
        finally:
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                await aclose()
            metrics.REQUESTS.labels("StreamSynthesize", outcome).inc()

    async def Transcribe(
        self, request: voice_pb2.TranscribeRequest, context: ServicerContext[Any, Any]
    ) -> voice_pb2.TranscribeResponse:
        v = Violations()
        size = len(request.audio_content)
        if size == 0:
            v.add("audio_content", "is required")
        elif size > MAX_AUDIO_BYTES:
            v.add("audio_content", f"is {size} bytes; at most {MAX_AUDIO_BYTES} (10 MiB) allowed")
        cfg = request.config
        if cfg.encoding not in (0, *_ENCODINGS):
            v.add("config.encoding", f"unsupported encoding {cfg.encoding}")
        _check_rate(v, "config.sample_rate_hertz", cfg.sample_rate_hertz)
        v.text("config.language_code", cfg.language_code, max_bytes=35)
        _check_engines(v, "config.engines", cfg.engines, STT_ENGINES)
        if v:
            metrics.REQUESTS.labels("Transcribe", "invalid").inc()
        v.raise_if_any()
        try:
            pcm = await recognition_input(
                request.audio_content,
                cfg.encoding,
                cfg.sample_rate_hertz,
                max_seconds=self.limits.audio_seconds,
                pool=self.decoders,
            )
        except Exception:
            metrics.REQUESTS.labels("Transcribe", "invalid").inc()
            raise
        try:
            result = await self.chain.transcribe(
                pcm,
                language_code=cfg.language_code,
                engines=list(cfg.engines),
                caller_remaining=_remaining(context),
            )
        except Exception:
            metrics.REQUESTS.labels("Transcribe", "failed").inc()
            raise
        metrics.REQUESTS.labels("Transcribe", "ok").inc()
        return voice_pb2.TranscribeResponse(
            transcript=result.transcript.text,
            confidence=result.transcript.confidence,
            engine=result.engine,
            duration_ms=int(pcm.duration_s * 1000),
            attempts=_attempts(result.attempts),
        )

    async def ListVoices(
        self, request: voice_pb2.ListVoicesRequest, context: ServicerContext[Any, Any]
    ) -> voice_pb2.ListVoicesResponse:
        v = Violations()
        v.text("language_code", request.language_code, max_bytes=35)
        v.raise_if_any()
        metrics.REQUESTS.labels("ListVoices", "ok").inc()
        return voice_pb2.ListVoicesResponse(
            voices=[
                voice_pb2.VoiceInfo(
                    name=d.name,
                    language_codes=list(d.language_codes),
                    engine=d.engine,
                    natural_sample_rate_hertz=d.natural_sample_rate,
                )
                for d in self.chain.voices(request.language_code)
            ]
        )
