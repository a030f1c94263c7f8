"""Inbound voice notes: the gateway-side domain function against a real voice service process."""

from __future__ import annotations

import grpc
import pytest
from flynn.v1 import common_pb2, config_pb2, voice_pb2

from flynn_runtime import targeting
from flynn_runtime.channels import client_channel
from flynn_runtime.errors import Code, FlynnError
from tests.support.mesh import ServiceProcess, Tokens
from tests.support.voice import voice_stub, word_error_rate
from voice_svc.client import VoiceTranscriber
from voice_svc.inbound import handle_inbound_audio

SPOKEN = "Remember to buy milk and bread on the way home."
TARGET = targeting.Target(session_key="tg:42", channel="telegram")


def audio_on() -> config_pb2.FlynnConfig:
    cfg = config_pb2.FlynnConfig()
    cfg.audio.enabled = True
    cfg.audio.deadline.seconds = 60
    return cfg


@pytest.fixture(scope="module")
def voice_note(voice_svc: ServiceProcess, voice_tokens: Tokens) -> common_pb2.Audio:
    with voice_stub(voice_svc.address, "") as stub:
        r = stub.Synthesize(
            voice_pb2.SynthesizeRequest(
                text=SPOKEN, audio_config=voice_pb2.AudioConfig(encoding=common_pb2.AUDIO_ENCODING_OGG_OPUS)
            ),
            metadata=voice_tokens.md("service"),
            timeout=60,
        )
    return common_pb2.Audio(
        encoding=r.encoding, sample_rate_hertz=r.sample_rate_hertz, content=r.audio_content
    )


async def test_voice_note_becomes_text_with_attachment(
    voice_svc: ServiceProcess, voice_tokens: Tokens, voice_note: common_pb2.Audio
) -> None:
    ch = client_channel(voice_svc.address, voice_tokens.service)
    try:
        out = await handle_inbound_audio(audio_on(), TARGET, voice_note, VoiceTranscriber(lambda: ch))
    finally:
        await ch.close(None)
    assert word_error_rate(SPOKEN, out.text) <= 0.2, out.text
    assert not out.user_notice
    a = out.attachment
    assert a.kind == "audio" and a.content_type == "audio/ogg" and a.size_bytes == len(voice_note.content)
    assert a.uri.endswith(a.sha256) and len(a.sha256) == 64


async def test_audio_off_refuses_with_a_clear_status(voice_note: common_pb2.Audio) -> None:
    with pytest.raises(FlynnError) as ei:
        unused = grpc.aio.insecure_channel("127.0.0.1:9")
        await handle_inbound_audio(
            config_pb2.FlynnConfig(), TARGET, voice_note, VoiceTranscriber(lambda: unused)
        )
    assert ei.value.code is Code.FAILED_PRECONDITION and ei.value.reason == "AUDIO_DISABLED"


async def test_unreadable_audio_or_voice_down_tells_the_user(
    voice_svc: ServiceProcess, voice_tokens: Tokens
) -> None:
    garbage = common_pb2.Audio(content=b"\x13\x37" * 4000)
    ch = client_channel(voice_svc.address, voice_tokens.service)
    try:
        out = await handle_inbound_audio(audio_on(), TARGET, garbage, VoiceTranscriber(lambda: ch))
    finally:
        await ch.close(None)
    assert out.text == "" and out.failure_reason == "unreadable_audio" and "Sorry" in out.user_notice
    dead = grpc.aio.insecure_channel("127.0.0.1:9")  # nothing listens on the discard port
    try:
        out = await handle_inbound_audio(audio_on(), TARGET, garbage, VoiceTranscriber(lambda: dead))
    finally:
        await dead.close(None)
    assert out.failure_reason == "voice_unavailable" and out.user_notice
