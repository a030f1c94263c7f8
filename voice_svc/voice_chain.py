"""The engine chains (domain, no grpc): try each engine in order within its share of the deadline.

TTS chain from `tts.engines` (default piper, espeak-ng) within `tts.deadline` (default 3 s);
recognition chain from `audio.engines` (default faster-whisper, pocketsphinx) within
`audio.deadline` (default 20 s). Both are read from the live config on every request. The caller's
own deadline shortens the budget. Each engine gets remaining/(engines left), so time an early
engine did not use flows to the next. Every engine tried is recorded as an Attempt; when all fail
the request fails with UNAVAILABLE / ALL_ENGINES_FAILED listing the attempts (never INTERNAL).
An engine that "succeeds" with silence counts as a failure: success must mean audio.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from flynn_runtime.config_source import ConfigSource
from flynn_runtime.errors import FlynnError, unavailable
from flynn_runtime.timestamps import duration_seconds
from voice_svc import metrics
from voice_svc.audio_codec import Pcm, is_silent
from voice_svc.engines import (
    DEFAULT_STT_CHAIN,
    DEFAULT_TTS_CHAIN,
    ENGINE_ERROR,
    TIMEOUT,
    UNAVAILABLE,
    UNSUPPORTED,
    EngineFailure,
    FaultSwitch,
    RecognitionEngine,
    SpeechEngine,
    SpeechOptions,
    Transcript,
    VoiceDesc,
    split_sentences,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_TTS_DEADLINE = 3.0
DEFAULT_STT_DEADLINE = 20.0
# Kept back from the caller's deadline so the refusal (with its attempts) reaches the caller in time.
CALLER_MARGIN = 0.02


@dataclass(frozen=True)
class Attempt:
    engine: str
    ok: bool
    cause: str = ""
    detail: str = ""
    elapsed_ms: int = 0


@dataclass(frozen=True)
class SpeechRequest:
    """What to speak, and how: the input of `synthesize` and `stream_synthesize`."""

    text: str
    voice: str = ""
    language_code: str = ""
    speaking_rate: float = 1.0
    engines: Sequence[str] = ()
    #: Seconds left of the caller's own deadline (None: no deadline); it shortens the chain's budget.
    caller_remaining: float | None = None


@dataclass(frozen=True)
class Synthesis:
    pcm: Pcm
    engine: str
    voice: str
    attempts: list[Attempt]


@dataclass(frozen=True)
class SpokenSentence:
    pcm: Pcm
    text: str
    engine: str
    attempts: list[Attempt]


@dataclass(frozen=True)
class Recognition:
    transcript: Transcript
    engine: str
    attempts: list[Attempt]


def all_failed(kind: str, attempts: Sequence[Attempt]) -> FlynnError:
    metrics.CHAIN_EXHAUSTED.labels(kind).inc()
    summary = ", ".join(f"{a.engine}: {a.cause}" for a in attempts) or "no engine configured"
    meta = {
        "attempts": "; ".join(f"{a.engine}={a.cause}:{a.elapsed_ms}ms:{a.detail[:120]}" for a in attempts)
    }
    for a in attempts:
        meta[f"engine.{a.engine}"] = a.cause
    # One word for callers that classify the failure (run control's tts fallback reason).
    causes = {a.cause for a in attempts}
    meta["cause"] = causes.pop() if len(causes) == 1 else ENGINE_ERROR
    return unavailable(
        f"every {kind} engine failed ({summary})", reason="ALL_ENGINES_FAILED", retry_after=1.0, **meta
    )


class VoiceChain:
    def __init__(
        self,
        config: ConfigSource,
        tts: Sequence[SpeechEngine],
        stt: Sequence[RecognitionEngine],
        faults: FaultSwitch | None = None,
    ) -> None:
        self.config = config
        self.tts = {e.name: e for e in tts}
        self.stt = {e.name: e for e in stt}
        self.faults = faults or FaultSwitch()

    async def start(self) -> None:
        for t in self.tts.values():
            await t.start()
        for r in self.stt.values():
            await r.start()

    async def close(self) -> None:
        for t in self.tts.values():
            await t.close()
        for r in self.stt.values():
            await r.close()

    # Configuration ------------------------------------------------------------------------

    def tts_chain(self, requested: Sequence[str] = ()) -> list[str]:
        return list(requested) or list(self.config.config.tts.engines) or list(DEFAULT_TTS_CHAIN)

    def stt_chain(self, requested: Sequence[str] = ()) -> list[str]:
        return list(requested) or list(self.config.config.audio.engines) or list(DEFAULT_STT_CHAIN)

    def tts_deadline(self) -> float:
        return duration_seconds(self.config.config.tts.deadline, DEFAULT_TTS_DEADLINE)

    def stt_deadline(self) -> float:
        return duration_seconds(self.config.config.audio.deadline, DEFAULT_STT_DEADLINE)

    @staticmethod
    def _budget(configured: float, caller_remaining: float | None) -> float:
        if caller_remaining is None:
            return configured
        return max(0.0, min(configured, caller_remaining - CALLER_MARGIN))

    def voices(self, language_code: str = "") -> list[VoiceDesc]:
        out: list[VoiceDesc] = []
        lc = language_code.lower()
        for engine in self.tts.values():
            for v in engine.voices():
                if not lc or any(
                    code.lower() == lc or code.lower().split("-")[0] == lc for code in v.language_codes
                ):
                    out.append(v)
        return out

    # Synthesis ----------------------------------------------------------------------------

    def _prepare(self, name: str, voice: str, language_code: str) -> tuple[SpeechEngine, str]:
        engine = self.tts.get(name)
        if engine is None:
            raise EngineFailure(UNAVAILABLE, f"no engine named {name!r} in this build")
        if (why := engine.unavailable_reason()) is not None:
            raise EngineFailure(UNAVAILABLE, why)
        picked = engine.pick_voice(voice, language_code)
        if picked is None:
            raise EngineFailure(UNSUPPORTED, f"no voice {voice!r} for language {language_code!r}")
        return engine, picked

    def _fail(
        self, kind: str, attempts: list[Attempt], name: str, cause: str, detail: str, started: float
    ) -> None:
        elapsed = int((time.monotonic() - started) * 1000)
        attempts.append(Attempt(name, False, cause, detail, elapsed))
        metrics.ENGINE_FAILURES.labels(kind, name, cause).inc()
        log.warning(
            f"{kind} engine failed",
            extra={"engine": name, "cause": cause, "detail": detail, "elapsed_ms": elapsed},
        )

    async def _first_success(
        self,
        kind: str,
        chain: Sequence[str],
        deadline: float,
        attempt: Callable[[str, float], Awaitable[T]],
        *,
        waiting_for: str = "result",
    ) -> tuple[str, T, float, list[Attempt]]:
        """Try the engines of `chain` in order until one succeeds: (engine, its result, seconds it took,
        attempts). Fair share: each engine gets the time left divided by the engines left, so a
        hanging first engine cannot eat the budget of the fallbacks. Raises ALL_ENGINES_FAILED."""
        attempts: list[Attempt] = []
        for i, name in enumerate(chain):
            started = time.monotonic()
            share = (deadline - started) / (len(chain) - i)
            if share <= 0:
                self._fail(kind, attempts, name, TIMEOUT, "no time left in the deadline", started)
                continue
            try:
                result = await attempt(name, share)
            except Exception as e:  # an engine bug must not become INTERNAL: the chain moves on
                cause, detail = _cause(e, share, waiting_for)
                self._fail(kind, attempts, name, cause, detail, started)
                continue
            elapsed = time.monotonic() - started
            attempts.append(Attempt(name, True, "", "", int(elapsed * 1000)))
            return name, result, elapsed, attempts
        raise all_failed(kind, attempts)

    async def synthesize(self, req: SpeechRequest) -> Synthesis:
        """The whole text spoken by the first engine of the chain that succeeds."""

        async def attempt(name: str, share: float) -> tuple[Pcm, str]:
            engine, picked = self._prepare(name, req.voice, req.language_code)
            opts = SpeechOptions(picked, req.speaking_rate or 1.0, self.faults.mode(name))
            pcm = await asyncio.wait_for(_collect(engine.synthesize([req.text], opts)), share)
            if is_silent(pcm):
                raise EngineFailure(ENGINE_ERROR, "engine reported success but produced no audible audio")
            return pcm, picked

        deadline = time.monotonic() + self._budget(self.tts_deadline(), req.caller_remaining)
        name, (pcm, picked), elapsed, attempts = await self._first_success(
            "tts", self.tts_chain(req.engines), deadline, attempt, waiting_for="audio"
        )
        metrics.SYNTH_SECONDS.labels(name).observe(elapsed)
        if pcm.duration_s > 0:
            metrics.SYNTH_RTF.labels(name).observe(elapsed / pcm.duration_s)
        return Synthesis(pcm, name, picked, attempts)

    async def stream_synthesize(self, req: SpeechRequest) -> AsyncIterator[SpokenSentence]:
        """Sentences as they are spoken. The chain falls over only before the first chunk; each
        later sentence must come within the tts deadline, else the stream ends UNAVAILABLE."""
        sentences = split_sentences(req.text) or [req.text]
        per_sentence = self.tts_deadline()

        async def first_sentence(name: str, share: float) -> tuple[AsyncIterator[Pcm], Pcm]:
            engine, picked = self._prepare(name, req.voice, req.language_code)
            opts = SpeechOptions(picked, req.speaking_rate or 1.0, self.faults.mode(name))
            gen = engine.synthesize(sentences, opts)
            try:
                first = await asyncio.wait_for(anext(gen), share)
                if is_silent(first) and len(sentences) == 1:
                    raise EngineFailure(ENGINE_ERROR, "engine reported success but produced no audible audio")
            except Exception:
                await _aclose(gen)
                raise
            return gen, first

        deadline = time.monotonic() + self._budget(per_sentence, req.caller_remaining)
        name, (gen, first), elapsed, attempts = await self._first_success(
            "tts", self.tts_chain(req.engines), deadline, first_sentence
        )
        metrics.SYNTH_FIRST_CHUNK_SECONDS.labels(name).observe(elapsed)
        started = time.monotonic() - elapsed
        total_audio = first.duration_s
        try:
            yield SpokenSentence(first, sentences[0], name, attempts)
            for sentence in sentences[1:]:
                pcm = await self._next_sentence(gen, name, attempts, per_sentence)
                total_audio += pcm.duration_s
                yield SpokenSentence(pcm, sentence, name, attempts)
            await _drain_end(gen, name, per_sentence)
        finally:
            await _aclose(gen)
        took = time.monotonic() - started
        metrics.SYNTH_SECONDS.labels(name).observe(took)
        if total_audio > 0:
            metrics.SYNTH_RTF.labels(name).observe(took / total_audio)

    async def _next_sentence(
        self, gen: AsyncIterator[Pcm], name: str, attempts: list[Attempt], per_sentence: float
    ) -> Pcm:
        """The next sentence's audio of a stream past its first chunk; a failure ends the stream."""
        try:
            return await asyncio.wait_for(anext(gen), per_sentence)
        except (TimeoutError, EngineFailure, StopAsyncIteration) as e:
            cause, detail = _cause(e, per_sentence)
            self._fail("tts", attempts, name, cause, detail, time.monotonic())
            raise unavailable(
                f"{name} failed mid-stream ({cause}): {detail}",
                reason="ENGINE_FAILED_MID_STREAM",
                engine=name,
                cause=cause,
            ) from e

    # Recognition --------------------------------------------------------------------------

    async def transcribe(
        self,
        pcm: Pcm,
        *,
        language_code: str = "",
        engines: Sequence[str] = (),
        caller_remaining: float | None = None,
    ) -> Recognition:
        """The transcript of the first engine of the chain that succeeds."""

        async def attempt(name: str, share: float) -> Transcript:
            engine = self.stt.get(name)
            if engine is None:
                raise EngineFailure(UNAVAILABLE, f"no engine named {name!r} in this build")
            if (why := engine.unavailable_reason()) is not None:
                raise EngineFailure(UNAVAILABLE, why)
            if not engine.supports_language(language_code):
                raise EngineFailure(UNSUPPORTED, f"language {language_code!r} not supported")
            return await asyncio.wait_for(
                engine.transcribe(pcm, language_code, self.faults.mode(name)), share
            )

        deadline = time.monotonic() + self._budget(self.stt_deadline(), caller_remaining)
        name, result, elapsed, attempts = await self._first_success(
            "stt", self.stt_chain(engines), deadline, attempt
        )
        metrics.TRANSCRIBE_SECONDS.labels(name).observe(elapsed)
        if pcm.duration_s > 0:
            metrics.TRANSCRIBE_RTF.labels(name).observe(elapsed / pcm.duration_s)
        return Recognition(result, name, attempts)


async def _drain_end(gen: AsyncIterator[Pcm], name: str, per_sentence: float) -> None:
    """Read the engine's end of request so a warm worker is not killed as abandoned."""
    try:
        extra = await asyncio.wait_for(anext(gen), per_sentence)
        log.warning(
            "engine produced more pieces than sentences", extra={"engine": name, "samples": extra.samples}
        )
    except (StopAsyncIteration, TimeoutError, EngineFailure):
        pass


def _cause(e: BaseException, budget: float, waiting_for: str = "result") -> tuple[str, str]:
    if isinstance(e, TimeoutError):
        return TIMEOUT, f"no {waiting_for} within {budget * 1000:.0f} ms"
    if isinstance(e, EngineFailure):
        return e.cause, e.detail
    if isinstance(e, StopAsyncIteration):
        return ENGINE_ERROR, "engine produced no audio"
    return ENGINE_ERROR, f"{type(e).__name__}: {e}"


async def _collect(gen: AsyncIterator[Pcm]) -> Pcm:
    out = Pcm(b"", 0)
    try:
        async for piece in gen:
            out = piece if not out.data else out.concat(piece)
    finally:
        await _aclose(gen)
    return out


async def _aclose(gen: AsyncIterator[Pcm] | None) -> None:
    close = getattr(gen, "aclose", None)
    if close is not None:
        try:
            await close()
        except Exception:
            log.debug("engine stream close failed", exc_info=True)
