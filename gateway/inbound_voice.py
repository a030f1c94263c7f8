"""Inbound voice notes: gate, transcribe, keep the audio, or tell the user why not (DESIGN.md §7).

The calls to voice, canvas and run control's PostReply carry the gateway's own service token (a
channel token may not call them); the message itself is then submitted with the caller's token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import grpc
from flynn.v1 import (
    canvas_pb2,
    canvas_pb2_grpc,
    common_pb2,
    gateway_pb2,
    run_control_pb2,
    run_control_pb2_grpc,
    voice_pb2,
    voice_pb2_grpc,
)
from grpc.aio import ServicerContext

from flynn_runtime import targeting
from flynn_runtime.channels import downstream_timeout
from flynn_runtime.config_source import ConfigSource
from flynn_runtime.errors import Code, FlynnError, failed_precondition
from flynn_runtime.rich_status import from_rpc_error
from flynn_runtime.server import Runtime
from flynn_runtime.timestamps import duration_seconds

log = logging.getLogger(__name__)

MAX_AUDIO_BYTES = 10 * 1024 * 1024  # the voice service's Transcribe limit
CANVAS_MAX_BYTES = 1024 * 1024  # the canvas' default per-artifact limit
DEFAULT_DEADLINE = 20.0
CANVAS_TIMEOUT = 5.0
NOTICE_TIMEOUT = 5.0
NOTICE_TEXT = "Sorry, your voice note could not be understood ({cause}). Please try again or send text."

CONTENT_TYPES = {
    common_pb2.AUDIO_ENCODING_UNSPECIFIED: "audio/wav",
    common_pb2.AUDIO_ENCODING_LINEAR16: "audio/wav",
    common_pb2.AUDIO_ENCODING_OGG_OPUS: "audio/ogg",
    common_pb2.AUDIO_ENCODING_MP3: "audio/mpeg",
}

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def name_segment(value: str) -> str:
    """A canvas-safe path segment for `value`; anything rewritten or long gets a hash suffix so that
    two different values never share a segment."""
    safe = _UNSAFE.sub("_", value)
    if safe == value and 0 < len(safe) <= 72 and safe not in (".", ".."):
        return safe
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{safe[:60]}-{digest}"


def artifact_name(session_key: str, idempotency_key: str) -> str:
    return f"inbound/{name_segment(session_key)}/{name_segment(idempotency_key)}"


@dataclass(frozen=True)
class VoiceNote:
    transcript: str
    attachment: common_pb2.Attachment


NoteKey = tuple[str, str, str, str]
RECENT_NOTES = 4096


class InboundVoice:
    """Voice notes in. A replayed note (same channel, session, idempotency key and audio) is found before
    transcription: concurrent replays wait for the first one's result, later ones get it from a bounded
    memory of recent notes, and after a restart the canvas artifact already holding the same bytes is
    not written again. So 256 replays cost one transcription and write one canvas version."""

    def __init__(self, runtime: Runtime, config: ConfigSource) -> None:
        self._runtime = runtime
        self._config = config
        self._recent: OrderedDict[NoteKey, asyncio.Future[VoiceNote]] = OrderedDict()
        self.transcriptions = 0

    async def take(
        self, request: gateway_pb2.SendMessageRequest, context: ServicerContext[Any, Any]
    ) -> VoiceNote:
        self._check_enabled(request)
        key = (
            request.channel,
            request.session_key,
            request.idempotency_key,
            hashlib.sha256(request.audio.content).hexdigest(),
        )
        known = self._recent.get(key)
        if known is not None:
            self._recent.move_to_end(key)
            return await asyncio.shield(known)
        future: asyncio.Future[VoiceNote] = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)
        self._recent[key] = future
        while len(self._recent) > RECENT_NOTES:
            self._recent.popitem(last=False)
        try:
            note = await self._transcribe(request, context)
        except BaseException as e:
            # A failed or abandoned note is not remembered: the next replay tries again.
            self._recent.pop(key, None)
            if isinstance(e, Exception):
                future.set_exception(e)
            else:
                future.cancel()
            raise
        future.set_result(note)
        return note

    def _check_enabled(self, request: gateway_pb2.SendMessageRequest) -> None:
        cfg = self._config.config
        target = targeting.Target(session_key=request.session_key, channel=request.channel)
        decision = targeting.audio_enabled(cfg, target)
        if decision.value and not self._runtime.settings.deployed("voice"):
            decision = dataclasses.replace(
                decision, value=False, explanation="the voice service is not deployed in this mesh"
            )
        if not decision.value:
            self._runtime.audit.record(
                "voice_note_refused",
                session_key=request.session_key,
                channel=request.channel,
                idempotency_key=request.idempotency_key,
                reason="AUDIO_DISABLED",
                why=decision.explanation,
                config_revision=self._config.revision,
            )
            raise failed_precondition(
                f"voice notes are disabled for this session ({decision.explanation}); send text",
                "AUDIO_DISABLED",
                session_key=request.session_key,
                channel=request.channel,
            )

    async def _transcribe(
        self, request: gateway_pb2.SendMessageRequest, context: ServicerContext[Any, Any]
    ) -> VoiceNote:
        cfg = self._config.config
        self.transcriptions += 1
        audio = request.audio
        deadline = duration_seconds(cfg.audio.deadline, DEFAULT_DEADLINE)
        rec = voice_pb2.RecognitionConfig(
            encoding=audio.encoding,
            sample_rate_hertz=audio.sample_rate_hertz,
            engines=list(cfg.audio.engines),
        )
        stub = voice_pb2_grpc.VoiceStub(self._runtime.channel("voice"))
        try:
            resp = await stub.Transcribe(
                voice_pb2.TranscribeRequest(audio_content=audio.content, config=rec),
                timeout=downstream_timeout(context, deadline),
            )
        except grpc.aio.AioRpcError as err:
            await self._failed(request, context, err)
            raise  # unreachable: _failed raises
        transcript = resp.transcript.strip()
        if not transcript:
            await self._failed(request, context, None)
        attachment = await self._keep(request, context)
        return VoiceNote(transcript, attachment)

    async def _keep(
        self, request: gateway_pb2.SendMessageRequest, context: ServicerContext[Any, Any]
    ) -> common_pb2.Attachment:
        """The audio as a canvas artifact when possible, else a sha256 + size reference (uri empty)."""
        content = request.audio.content
        att = common_pb2.Attachment(
            kind="audio",
            content_type=CONTENT_TYPES.get(request.audio.encoding, "application/octet-stream"),
            sha256=hashlib.sha256(content).hexdigest(),
            size_bytes=len(content),
        )
        if len(content) > CANVAS_MAX_BYTES:
            return att
        name = artifact_name(request.session_key, request.idempotency_key)
        stub = canvas_pb2_grpc.CanvasStub(self._runtime.channel("nodes"))
        try:
            held = await stub.GetArtifact(
                canvas_pb2.GetArtifactRequest(name=name), timeout=downstream_timeout(context, CANVAS_TIMEOUT)
            )
            if held.artifact.sha256 == att.sha256:  # a replay after a restart: kept already
                att.uri = f"canvas://{name}"
                return att
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                log.warning("canvas lookup of a voice note failed", extra={"code": err.code().name})
        try:
            await stub.PutArtifact(
                canvas_pb2.PutArtifactRequest(name=name, content_type=att.content_type, content=content),
                timeout=downstream_timeout(context, CANVAS_TIMEOUT),
            )
            att.uri = f"canvas://{name}"
        except grpc.aio.AioRpcError as err:
            log.warning(
                "voice note kept as a hash reference only: canvas refused it",
                extra={"code": err.code().name, "detail": err.details(), "artifact": name},
            )
        return att

    async def _failed(
        self,
        request: gateway_pb2.SendMessageRequest,
        context: ServicerContext[Any, Any],
        err: grpc.aio.AioRpcError | None,
    ) -> None:
        """Tell the user (NOTICE reply, idempotent per message), audit, and raise an error naming why."""
        if err is None:
            cause, code, detail = "empty_transcript", Code.FAILED_PRECONDITION, "no speech was recognised"
        else:
            rich = from_rpc_error(err)
            cause = (rich.reason if rich is not None and rich.reason else err.code().name).lower()
            detail = err.details() or err.code().name
            if rich is None and err.code() == grpc.StatusCode.UNAVAILABLE:
                # The channel's own message names internal hosts and ports: logged, never sent on.
                log.warning("voice service unreachable", extra={"detail": detail})
                detail = "the voice service is unavailable"
            code = {
                grpc.StatusCode.INVALID_ARGUMENT: Code.INVALID_ARGUMENT,
                grpc.StatusCode.DEADLINE_EXCEEDED: Code.DEADLINE_EXCEEDED,
                grpc.StatusCode.UNAVAILABLE: Code.UNAVAILABLE,
            }.get(err.code(), Code.FAILED_PRECONDITION)
        notice_id = ""
        stub = run_control_pb2_grpc.RunControlStub(self._runtime.channel("queue"))
        try:
            posted = await stub.PostReply(
                run_control_pb2.PostReplyRequest(
                    kind=run_control_pb2.REPLY_KIND_NOTICE,
                    session_key=request.session_key,
                    channel=request.channel,
                    text=NOTICE_TEXT.format(cause=cause.replace("_", " ")),
                    idempotency_key=f"{request.idempotency_key}/transcription-failed"[:256],
                ),
                timeout=NOTICE_TIMEOUT,
            )
            notice_id = posted.reply.reply_id
        except grpc.aio.AioRpcError as post_err:
            log.error(
                "transcription failed and the notice could not be posted",
                extra={"code": post_err.code().name, "detail": post_err.details()},
            )
        self._runtime.audit.record(
            "voice_note_failed",
            session_key=request.session_key,
            channel=request.channel,
            idempotency_key=request.idempotency_key,
            reason=cause,
            detail=detail,
            notice_reply_id=notice_id or None,
        )
        raise FlynnError(
            code,
            f"the voice note could not be transcribed ({cause}: {detail})"
            + (
                "; the user was told in a notice reply"
                if notice_id
                else "; the notice could not be posted either"
            ),
            reason="TRANSCRIPTION_FAILED",
            metadata={"cause": cause, "notice_reply_id": notice_id},
            retry_after_seconds=1.0 if code in (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED) else None,
        )
