"""Speech for final replies: the policy around a Synthesizer (DESIGN.md §7).

Run control writes the text reply durably first (speech_state 'pending', not yet streamed), then asks
a Synthesizer for audio within tts.deadline. Success attaches the audio; any failure is classified
(engine_error / timeout / voice_unavailable / empty_audio) and the reply goes out as text. Text is
never lost: a reply still pending at a restart is published as text with reason "restart".
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

from flynn.v1 import common_pb2, config_pb2

DEFAULT_DEADLINE = 3.0
FALLBACK_REASONS = ("engine_error", "timeout", "voice_unavailable", "empty_audio", "restart")

_ENCODINGS = {
    "": common_pb2.AUDIO_ENCODING_LINEAR16,
    "LINEAR16": common_pb2.AUDIO_ENCODING_LINEAR16,
    "OGG_OPUS": common_pb2.AUDIO_ENCODING_OGG_OPUS,
    "MP3": common_pb2.AUDIO_ENCODING_MP3,
}


class SpeechFailure(Exception):
    """Synthesis failed; `reason` is one of FALLBACK_REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class SpeechRequest:
    text: str
    encoding: common_pb2.AudioEncoding.ValueType
    voice: str
    engines: tuple[str, ...]
    timeout: float


class Synthesizer(Protocol):
    async def synthesize(self, request: SpeechRequest) -> common_pb2.Audio:
        """Audio for the text, or SpeechFailure."""


@dataclass(frozen=True)
class SpeechOutcome:
    audio: common_pb2.Audio | None
    fallback_reason: str = ""
    detail: str = ""


def request_for(cfg: config_pb2.FlynnConfig, text: str) -> SpeechRequest:
    t = cfg.tts
    deadline = t.deadline.ToTimedelta().total_seconds() if t.HasField("deadline") else 0.0
    return SpeechRequest(
        text=text,
        encoding=_ENCODINGS.get(t.encoding.upper(), common_pb2.AUDIO_ENCODING_LINEAR16),
        voice=t.voice,
        engines=tuple(t.engines),
        timeout=deadline if deadline > 0 else DEFAULT_DEADLINE,
    )


async def speak(synth: Synthesizer | None, request: SpeechRequest) -> SpeechOutcome:
    """Run one synthesis under its deadline and classify the result; never raises (except cancellation)."""
    if synth is None:
        return SpeechOutcome(None, "voice_unavailable", "no voice service configured")
    try:
        # The synthesizer passes the timeout to its call; this guard bounds anything else it does.
        audio = await asyncio.wait_for(synth.synthesize(request), request.timeout + 0.25)
    except SpeechFailure as e:
        return SpeechOutcome(None, e.reason, e.detail)
    except TimeoutError:
        return SpeechOutcome(None, "timeout", f"no audio within {request.timeout:.3f}s")
    except asyncio.CancelledError:
        raise
    except Exception as e:  # an engine's bug must not cost the reply
        return SpeechOutcome(None, "engine_error", repr(e))
    if not audio.content:
        return SpeechOutcome(None, "empty_audio", "the voice service returned no audio")
    return SpeechOutcome(audio)
