"""Inbound voice notes (DESIGN.md §7, issue 7 item 4): what the gateway does with an audio message.

Domain only (no grpc): the gateway passes the applied config, the target, the audio and a
`Transcriber` (voice_svc.client.VoiceTranscriber calls Voice.Transcribe). The outcome is either
text for run control (with the audio kept as an attachment reference), or a notice to send the
user when transcription failed: a voice note is never silently lost. With audio.enabled off for
the target, the message is refused with FAILED_PRECONDITION / AUDIO_DISABLED (the caller audits it).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

from flynn.v1 import common_pb2, config_pb2

from flynn_runtime import targeting
from flynn_runtime.errors import failed_precondition
from flynn_runtime.timestamps import duration_seconds

CONTENT_TYPES = {
    common_pb2.AUDIO_ENCODING_UNSPECIFIED: "audio/wav",
    common_pb2.AUDIO_ENCODING_LINEAR16: "audio/wav",
    common_pb2.AUDIO_ENCODING_OGG_OPUS: "audio/ogg",
    common_pb2.AUDIO_ENCODING_MP3: "audio/mpeg",
}


class TranscriptionFailure(Exception):
    """Transcription did not produce text; `reason` is short and safe to show (e.g. "unreadable_audio")."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class Transcriber(Protocol):
    async def transcribe(self, audio: common_pb2.Audio, language_code: str, deadline: float) -> str:
        """Text of the audio, or TranscriptionFailure."""


@dataclass(frozen=True)
class InboundOutcome:
    text: str  # what enters run control ("" when transcription failed)
    attachment: common_pb2.Attachment  # reference to the original audio
    user_notice: str = ""  # set when the user must be told the voice note was not understood
    failure_reason: str = ""


def attachment_for(
    audio: common_pb2.Audio, uri_prefix: str = "voice-note://sha256/"
) -> common_pb2.Attachment:
    digest = hashlib.sha256(audio.content).hexdigest()
    return common_pb2.Attachment(
        kind="audio",
        content_type=CONTENT_TYPES.get(audio.encoding, "application/octet-stream"),
        uri=f"{uri_prefix}{digest}",
        sha256=digest,
        size_bytes=len(audio.content),
    )


def transcription_deadline(cfg: config_pb2.FlynnConfig, default: float = 20.0) -> float:
    return duration_seconds(cfg.audio.deadline, default)


async def handle_inbound_audio(
    cfg: config_pb2.FlynnConfig,
    target: targeting.Target,
    audio: common_pb2.Audio,
    transcriber: Transcriber,
    *,
    language_code: str = "",
    uri_prefix: str = "voice-note://sha256/",
) -> InboundOutcome:
    decision = targeting.audio_enabled(cfg, target)
    if not decision.value:
        raise failed_precondition(
            f"audio messages are not accepted here ({decision.explanation})",
            "AUDIO_DISABLED",
            channel=target.channel,
            session=target.session_key,
        )
    attachment = attachment_for(audio, uri_prefix)
    try:
        text = (await transcriber.transcribe(audio, language_code, transcription_deadline(cfg))).strip()
    except TranscriptionFailure as e:
        return InboundOutcome("", attachment, notice(e.reason), e.reason)
    if not text:
        return InboundOutcome("", attachment, notice("no_speech"), "no_speech")
    return InboundOutcome(text, attachment)


def notice(reason: str) -> str:
    why = {
        "no_speech": "I could not hear any words in it",
        "unreadable_audio": "I could not read the audio format",
        "voice_unavailable": "speech recognition is unavailable right now",
        "timeout": "recognizing it took too long",
    }.get(reason, "speech recognition failed")
    return f"Sorry, I could not understand your voice message ({why}). Could you send it as text?"
