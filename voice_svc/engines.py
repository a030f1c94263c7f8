"""The one interface every speech engine implements, and the failure causes the chain records.

Synthesis engines turn a list of sentences into one PCM piece per sentence (so streaming can send a
sentence as soon as it is spoken); recognition engines turn 16 kHz mono PCM into text. Engines do
not enforce deadlines themselves: the chain cancels them, and each engine must stay cancel-safe
(kill its subprocess, drop a half-read worker). No grpc here.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from voice_svc.audio_codec import Pcm

# EngineAttempt.cause values (voice.proto).
ENGINE_ERROR = "engine_error"
TIMEOUT = "timeout"
UNAVAILABLE = "unavailable"
UNSUPPORTED = "unsupported"

TTS_ENGINES = ("piper", "espeak-ng")
STT_ENGINES = ("faster-whisper", "pocketsphinx")
DEFAULT_TTS_CHAIN = ("piper", "espeak-ng")
DEFAULT_STT_CHAIN = ("faster-whisper", "pocketsphinx")


class EngineFailure(Exception):
    """An engine could not do the job; `cause` is one of the EngineAttempt causes."""

    def __init__(self, cause: str, detail: str) -> None:
        super().__init__(detail)
        self.cause = cause
        self.detail = detail


@dataclass(frozen=True)
class VoiceDesc:
    name: str
    language_codes: tuple[str, ...]
    engine: str
    natural_sample_rate: int


@dataclass(frozen=True)
class SpeechOptions:
    voice: str  # engine-specific voice name, resolved by pick_voice
    speaking_rate: float = 1.0
    fault: str = ""  # fault injection: "", "fail" or "hang" (FaultSwitch)


@dataclass(frozen=True)
class Transcript:
    text: str
    confidence: float


class SpeechEngine(Protocol):
    name: str

    def unavailable_reason(self) -> str | None:
        """Why the engine cannot run here (not installed, model missing), or None."""

    def voices(self) -> list[VoiceDesc]: ...

    def pick_voice(self, name: str, language_code: str) -> str | None:
        """The engine's voice for a request, or None when it has no such voice/language."""

    def synthesize(self, sentences: list[str], opts: SpeechOptions) -> AsyncIterator[Pcm]:
        """One PCM piece per sentence, in order; raises EngineFailure."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class RecognitionEngine(Protocol):
    name: str

    def unavailable_reason(self) -> str | None: ...

    def supports_language(self, language_code: str) -> bool: ...

    async def transcribe(self, pcm: Pcm, language_code: str, fault: str = "") -> Transcript:
        """Text of 16 kHz mono PCM; raises EngineFailure."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...


@dataclass
class FaultSwitch:
    """Fault injection for tests and drills (--fail-engines / --hang-engines, FLYNN_VOICE_*_ENGINES).

    A failing engine raises engine_error through its real code path (the piper worker is asked to
    fail); a hanging engine never answers (the piper worker really hangs and is killed on timeout).
    """

    fail: frozenset[str] = field(default_factory=frozenset)
    hang: frozenset[str] = field(default_factory=frozenset)

    def mode(self, engine: str) -> str:
        if engine in self.hang:
            return "hang"
        if engine in self.fail:
            return "fail"
        return ""

    @classmethod
    def parse(cls, fail: str, hang: str) -> FaultSwitch:
        return cls(frozenset(_names(fail)), frozenset(_names(hang)))

    @classmethod
    def from_env(cls) -> FaultSwitch:
        return cls.parse(
            os.environ.get("FLYNN_VOICE_FAIL_ENGINES", ""), os.environ.get("FLYNN_VOICE_HANG_ENGINES", "")
        )


def _names(spec: str) -> Iterable[str]:
    return (n.strip() for n in spec.split(",") if n.strip())


_SENTENCE_END = re.compile(r"(?<=[.!?;:…])\s+|\n+")
MAX_SENTENCE_CHARS = 400


def split_sentences(text: str) -> list[str]:
    """Sentence-sized pieces (long sentences are cut at a space so a chunk stays small)."""
    out: list[str] = []
    for raw in _SENTENCE_END.split(text):
        s = raw.strip()
        while len(s) > MAX_SENTENCE_CHARS:
            cut = s.rfind(" ", 0, MAX_SENTENCE_CHARS)
            cut = cut if cut > 0 else MAX_SENTENCE_CHARS
            out.append(s[:cut].strip())
            s = s[cut:].strip()
        if s and any(c.isalnum() for c in s):
            out.append(s)
    return out
