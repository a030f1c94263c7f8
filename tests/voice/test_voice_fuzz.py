"""Hostile input never produces INTERNAL: each request is answered, refused naming a field, or UNAVAILABLE."""

from __future__ import annotations

import io
import random
import struct
import wave

import grpc
from flynn.v1 import common_pb2, voice_pb2

from tests.support.mesh import ServiceProcess, Tokens
from tests.support.voice import status_details, voice_stub

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}


def _wav(rate: int, channels: int = 1, width: int = 2, frames: int = 1600) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(b"\x10" * (frames * channels * width))
    return buf.getvalue()


def hostile_audio(rng: random.Random) -> list[tuple[bytes, voice_pb2.RecognitionConfig]]:
    good = _wav(16000)
    cases: list[tuple[bytes, voice_pb2.RecognitionConfig]] = []
    plain = voice_pb2.RecognitionConfig()
    for _ in range(8):
        cases.append((rng.randbytes(rng.randint(1, 5000)), plain))
    for cut in (4, 12, 20, 36, 44, 45, 100):
        cases.append((good[:cut], plain))
    for prefix in (b"RIFF", b"OggS", b"ID3", b"\xff\xfb", b"fLaC"):
        cases.append((prefix + rng.randbytes(2000), plain))
    bad_header = bytearray(good)
    struct.pack_into("<I", bad_header, 24, 0)  # sample rate 0
    cases.append((bytes(bad_header), plain))
    bad_header = bytearray(good)
    struct.pack_into("<H", bad_header, 22, 0)  # zero channels
    cases.append((bytes(bad_header), plain))
    cases.append((_wav(8000, width=1), plain))
    cases.append((_wav(96000, channels=6), plain))
    l16 = common_pb2.AUDIO_ENCODING_LINEAR16
    for rate in (-1, 0, 8000, 44100, 2**31 - 1):
        cases.append((b"\x00\x01" * 800, voice_pb2.RecognitionConfig(encoding=l16, sample_rate_hertz=rate)))
    cases.append((b"\x00" * 1601, voice_pb2.RecognitionConfig(encoding=l16, sample_rate_hertz=16000)))
    cases.append((good, voice_pb2.RecognitionConfig(encoding=common_pb2.AUDIO_ENCODING_OGG_OPUS)))
    cases.append((good, voice_pb2.RecognitionConfig(encoding=common_pb2.AUDIO_ENCODING_MP3)))
    cases.append((good, voice_pb2.RecognitionConfig(language_code="x" * 100)))
    cases.append(
        (good, voice_pb2.RecognitionConfig(language_code="fr-FR"))
    )  # no engine speaks it: UNAVAILABLE
    return cases


HOSTILE_TEXT = [
    "...", "🙂🙂🙂", "\u200b\u200b", "a", "1", "x" * 5001, "line\nbreaks\n\n\nand\ttabs",
    "<speak>SSML is not interpreted</speak>", "‮reversed", "Ünïcödé façade naïve", "\x07\x08 bells", "a\x00b",
    "日本語のテキスト",
]  # fmt: skip


def test_hostile_audio_is_never_internal(voice_svc: ServiceProcess, voice_tokens: Tokens) -> None:
    rng = random.Random(7)
    seen: dict[str, int] = {}
    with voice_stub(voice_svc.address, "") as stub:
        for content, cfg in hostile_audio(rng):
            try:
                stub.Transcribe(
                    voice_pb2.TranscribeRequest(audio_content=content, config=cfg),
                    metadata=voice_tokens.md("service"),
                    timeout=60,
                )
                code = grpc.StatusCode.OK
            except grpc.RpcError as e:
                code = e.code()
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    assert status_details(e)[1], "INVALID_ARGUMENT must name a field"
                elif code == grpc.StatusCode.UNAVAILABLE:
                    info, _ = status_details(e)
                    assert info is not None and info.reason == "ALL_ENGINES_FAILED", e
                    code = grpc.StatusCode.OK
            assert code in ALLOWED, (code, content[:16], cfg)
            seen[code.name] = seen.get(code.name, 0) + 1
    assert seen.get("INVALID_ARGUMENT", 0) > 20


def test_hostile_text_is_never_internal(voice_svc: ServiceProcess, voice_tokens: Tokens) -> None:
    with voice_stub(voice_svc.address, "") as stub:
        for text in HOSTILE_TEXT:
            for call in ("unary", "stream"):
                try:
                    if call == "unary":
                        r = stub.Synthesize(
                            voice_pb2.SynthesizeRequest(text=text),
                            metadata=voice_tokens.md("service"),
                            timeout=60,
                        )
                        assert r.audio_content[:4] == b"RIFF" and r.duration_ms > 0
                    else:
                        chunks = list(
                            stub.StreamSynthesize(
                                voice_pb2.StreamSynthesizeRequest(text=text),
                                metadata=voice_tokens.md("service"),
                                timeout=60,
                            )
                        )
                        assert chunks and chunks[0].sample_rate_hertz > 0
                except grpc.RpcError as e:
                    assert e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAVAILABLE), (
                        text[:20],
                        e,
                    )
                    if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                        assert "text" in status_details(e)[1]


def test_longest_text_is_spoken(voice_svc: ServiceProcess, voice_tokens: Tokens) -> None:
    text = ("Flynn reads long replies aloud. " * 160)[:5000]
    with voice_stub(voice_svc.address, "") as stub:
        r = stub.Synthesize(
            voice_pb2.SynthesizeRequest(text=text, engines=["espeak-ng"]),
            metadata=voice_tokens.md("service"),
            timeout=60,
        )
    assert r.engine == "espeak-ng" and r.duration_ms > 120_000
