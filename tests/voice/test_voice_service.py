"""flynn.v1.Voice through a real voice service process: audio formats, streaming, recognition, bad input."""

from __future__ import annotations

import io
import json
import wave
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from flynn.v1 import common_pb2, voice_pb2

from tests.support.mesh import ServiceProcess, Tokens, grpcurl
from tests.support.voice import (
    inspect_pcm,
    inspect_wav,
    status_details,
    voice_process,
    voice_stub,
    word_error_rate,
)

VOICE_NOTE = "Remember to buy milk and bread on the way home."
ROUND_TRIP = "Please remind me to call my sister at six in the evening."


def md(tokens: Tokens) -> tuple[tuple[str, str], ...]:
    return tokens.md("service")


def synth(svc: ServiceProcess, tokens: Tokens, text: str, **kw: object) -> voice_pb2.SynthesizeResponse:
    with voice_stub(svc.address, "") as stub:
        return stub.Synthesize(voice_pb2.SynthesizeRequest(text=text, **kw), metadata=md(tokens), timeout=30)  # type: ignore[arg-type]


def transcribe(
    svc: ServiceProcess, tokens: Tokens, audio: bytes, **cfg: object
) -> voice_pb2.TranscribeResponse:
    with voice_stub(svc.address, "") as stub:
        req = voice_pb2.TranscribeRequest(audio_content=audio, config=voice_pb2.RecognitionConfig(**cfg))  # type: ignore[arg-type]
        return stub.Transcribe(req, metadata=md(tokens), timeout=60)


def test_synthesize_linear16_is_a_wav_with_audio(voice_svc: ServiceProcess, voice_tokens: Tokens) -> None:
    r = synth(voice_svc, voice_tokens, "Good morning. Your meeting starts in ten minutes.")
    assert (
        r.engine == "piper"
        and r.encoding == common_pb2.AUDIO_ENCODING_LINEAR16
        and r.sample_rate_hertz == 22050
    )
    facts = inspect_wav(r.audio_content)
    assert facts.rate == 22050 and facts.voiced_fraction > 0.4
    assert abs(facts.duration_s * 1000 - r.duration_ms) < 50
    assert [(a.engine, a.ok) for a in r.attempts] == [("piper", True)]


def test_synthesize_resamples_and_encodes_ogg_opus_and_mp3(
    voice_svc: ServiceProcess, voice_tokens: Tokens
) -> None:
    r16 = synth(
        voice_svc, voice_tokens, "Resampled.", audio_config=voice_pb2.AudioConfig(sample_rate_hertz=16000)
    )
    assert inspect_wav(r16.audio_content).rate == 16000
    ogg = synth(
        voice_svc,
        voice_tokens,
        VOICE_NOTE,
        audio_config=voice_pb2.AudioConfig(encoding=common_pb2.AUDIO_ENCODING_OGG_OPUS),
    )
    assert ogg.audio_content[:4] == b"OggS" and b"OpusHead" in ogg.audio_content[:200]
    assert ogg.sample_rate_hertz == 48000 and ogg.duration_ms > 300
    mp3 = synth(
        voice_svc,
        voice_tokens,
        "An MP3.",
        audio_config=voice_pb2.AudioConfig(encoding=common_pb2.AUDIO_ENCODING_MP3),
    )
    assert mp3.audio_content[:3] == b"ID3" or mp3.audio_content[0] == 0xFF
    # The service reads its own voice note back.
    back = transcribe(voice_svc, voice_tokens, ogg.audio_content, encoding=common_pb2.AUDIO_ENCODING_OGG_OPUS)
    assert word_error_rate(VOICE_NOTE, back.transcript) <= 0.2, back.transcript


def test_stream_synthesize_sends_rate_first_then_headerless_pcm(
    voice_svc: ServiceProcess, voice_tokens: Tokens
) -> None:
    text = "This is the first sentence. Here comes the second. And this is the last one."
    with voice_stub(voice_svc.address, "") as stub:
        chunks = list(
            stub.StreamSynthesize(
                voice_pb2.StreamSynthesizeRequest(text=text), metadata=md(voice_tokens), timeout=30
            )
        )
    assert len(chunks) == 3
    assert chunks[0].sample_rate_hertz == 22050 and chunks[0].engine == "piper"
    assert all(c.sample_rate_hertz == 0 and c.engine == "" for c in chunks[1:])
    assert [c.text for c in chunks] == [
        "This is the first sentence.",
        "Here comes the second.",
        "And this is the last one.",
    ]
    for c in chunks:
        assert c.audio_content[:4] != b"RIFF" and len(c.audio_content) % 2 == 0
        assert inspect_pcm(c.audio_content, 22050).duration_s > 0.5
    with voice_stub(voice_svc.address, "") as stub:
        es = list(
            stub.StreamSynthesize(
                voice_pb2.StreamSynthesizeRequest(
                    text="Slow rate. Twice.", sample_rate_hertz=8000, engines=["espeak-ng"]
                ),
                metadata=md(voice_tokens),
                timeout=30,
            )
        )
    assert es[0].engine == "espeak-ng" and es[0].sample_rate_hertz == 8000 and len(es) == 2


def test_round_trip_piper_to_faster_whisper_word_error_at_most_20_percent(
    voice_svc: ServiceProcess, voice_tokens: Tokens
) -> None:
    audio = synth(voice_svc, voice_tokens, ROUND_TRIP).audio_content
    r = transcribe(voice_svc, voice_tokens, audio, engines=["faster-whisper"])
    assert r.engine == "faster-whisper"
    wer = word_error_rate(ROUND_TRIP, r.transcript)
    assert wer <= 0.2, (r.transcript, wer)
    assert 2000 < r.duration_ms < 8000 and 0 < r.confidence <= 1


def test_round_trip_espeak_to_faster_whisper(voice_svc: ServiceProcess, voice_tokens: Tokens) -> None:
    text = "Turn on the lights in the kitchen."
    audio = synth(voice_svc, voice_tokens, text, engines=["espeak-ng"]).audio_content
    r = transcribe(voice_svc, voice_tokens, audio)
    assert word_error_rate(text, r.transcript) <= 0.2, r.transcript


def test_pocketsphinx_transcribes_headerless_16k_pcm(voice_svc: ServiceProcess, voice_tokens: Tokens) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    wav16 = synth(
        voice_svc, voice_tokens, text, audio_config=voice_pb2.AudioConfig(sample_rate_hertz=16000)
    ).audio_content
    with wave.open(io.BytesIO(wav16)) as w:
        pcm = w.readframes(w.getnframes())
    r = transcribe(
        voice_svc,
        voice_tokens,
        pcm,
        encoding=common_pb2.AUDIO_ENCODING_LINEAR16,
        sample_rate_hertz=16000,
        engines=["pocketsphinx"],
    )
    assert r.engine == "pocketsphinx"
    assert word_error_rate(text, r.transcript) < 0.6, r.transcript


def test_stereo_44k_wav_is_mixed_down_and_resampled(voice_svc: ServiceProcess, voice_tokens: Tokens) -> None:
    import numpy as np

    wav = synth(
        voice_svc, voice_tokens, ROUND_TRIP, audio_config=voice_pb2.AudioConfig(sample_rate_hertz=44100)
    ).audio_content
    with wave.open(io.BytesIO(wav)) as w:
        mono = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(44100)
        w.writeframes(np.stack([mono, mono], axis=1).astype("<i2").tobytes())
    r = transcribe(voice_svc, voice_tokens, buf.getvalue())
    assert word_error_rate(ROUND_TRIP, r.transcript) <= 0.2, r.transcript


def test_list_voices(voice_svc: ServiceProcess, voice_tokens: Tokens) -> None:
    with voice_stub(voice_svc.address, "") as stub:
        all_voices = stub.ListVoices(
            voice_pb2.ListVoicesRequest(), metadata=md(voice_tokens), timeout=10
        ).voices
        en_us = stub.ListVoices(
            voice_pb2.ListVoicesRequest(language_code="en-US"), metadata=md(voice_tokens), timeout=10
        ).voices
    assert {(v.engine, v.name, v.natural_sample_rate_hertz) for v in en_us} >= {
        ("piper", "en_US-joe-medium", 22050),
        ("espeak-ng", "en-us", 22050),
    }
    assert len(all_voices) > len(en_us) and all("en-US" in v.language_codes for v in en_us)


BAD_SYNTH = [
    ({"text": ""}, "text"),
    ({"text": "   "}, "text"),
    ({"text": "x" * (1 << 20)}, "text"),
    ({"text": "hi", "audio_config": voice_pb2.AudioConfig(encoding=99)}, "audio_config.encoding"),  # type: ignore[arg-type]
    (
        {"text": "hi", "audio_config": voice_pb2.AudioConfig(sample_rate_hertz=7)},
        "audio_config.sample_rate_hertz",
    ),
    (
        {
            "text": "hi",
            "audio_config": voice_pb2.AudioConfig(
                encoding=common_pb2.AUDIO_ENCODING_OGG_OPUS, sample_rate_hertz=22050
            ),
        },
        "audio_config.sample_rate_hertz",
    ),
    ({"text": "hi", "audio_config": voice_pb2.AudioConfig(speaking_rate=9)}, "audio_config.speaking_rate"),
    ({"text": "hi", "engines": ["festival"]}, "engines[0]"),
]


@pytest.mark.parametrize(("fields", "field"), BAD_SYNTH, ids=[f for _, f in BAD_SYNTH])
def test_bad_synthesis_requests_name_the_field(
    voice_svc: ServiceProcess, voice_tokens: Tokens, fields: dict[str, object], field: str
) -> None:
    with voice_stub(voice_svc.address, "") as stub, pytest.raises(grpc.RpcError) as ei:
        stub.Synthesize(voice_pb2.SynthesizeRequest(**fields), metadata=md(voice_tokens), timeout=10)  # type: ignore[arg-type]
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in status_details(ei.value)[1]


def test_empty_stream_text_is_invalid(voice_svc: ServiceProcess, voice_tokens: Tokens) -> None:
    with voice_stub(voice_svc.address, "") as stub, pytest.raises(grpc.RpcError) as ei:
        list(
            stub.StreamSynthesize(
                voice_pb2.StreamSynthesizeRequest(text=""), metadata=md(voice_tokens), timeout=10
            )
        )
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "text" in status_details(ei.value)[1]


def _wav(rate: int, seconds: float = 0.5) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\x00\x01" * int(rate * seconds))
    return buf.getvalue()


BAD_AUDIO = [
    ({"audio_content": b""}, "audio_content"),
    ({"audio_content": bytes(range(256)) * 64}, "audio_content"),  # garbage, no container
    ({"audio_content": b"RIFF\x10\x00\x00\x00WAVEjunkjunk"}, "audio_content"),  # broken WAV
    ({"audio_content": b"OggS" + b"\x00" * 500}, "audio_content"),  # broken Ogg
    (
        {
            "audio_content": b"\x00" * 32000,
            "config": voice_pb2.RecognitionConfig(
                encoding=common_pb2.AUDIO_ENCODING_LINEAR16, sample_rate_hertz=22050
            ),
        },
        "config.sample_rate_hertz",
    ),
    (
        {
            "audio_content": b"\x00" * 32000,
            "config": voice_pb2.RecognitionConfig(encoding=common_pb2.AUDIO_ENCODING_LINEAR16),
        },
        "config.sample_rate_hertz",
    ),
    (
        {"audio_content": _wav(16000), "config": voice_pb2.RecognitionConfig(sample_rate_hertz=3)},
        "config.sample_rate_hertz",
    ),
    ({"audio_content": _wav(16000), "config": voice_pb2.RecognitionConfig(encoding=42)}, "config.encoding"),  # type: ignore[arg-type]
    (
        {"audio_content": _wav(16000), "config": voice_pb2.RecognitionConfig(engines=["vosk"])},
        "config.engines[0]",
    ),
    ({"audio_content": b"\x00" * (10 * 1024 * 1024 + 2)}, "audio_content"),
]


@pytest.mark.parametrize(
    ("fields", "field"), BAD_AUDIO, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD_AUDIO)]
)
def test_bad_audio_names_the_field(
    voice_svc: ServiceProcess, voice_tokens: Tokens, fields: dict[str, object], field: str
) -> None:
    with voice_stub(voice_svc.address, "") as stub, pytest.raises(grpc.RpcError) as ei:
        stub.Transcribe(voice_pb2.TranscribeRequest(**fields), metadata=md(voice_tokens), timeout=20)  # type: ignore[arg-type]
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, ei.value.details()
    assert field in status_details(ei.value)[1]


def test_grpcurl_lists_voices(voice_svc: ServiceProcess, voice_tokens: Tokens) -> None:
    out = grpcurl(
        voice_svc.address,
        "flynn.v1.Voice/ListVoices",
        token=voice_tokens.service,
        data='{"languageCode": "en-US"}',
    )
    assert out.returncode == 0, out.stderr
    assert "en_US-joe-medium" in json.loads(out.stdout)["voices"][0]["name"] or "piper" in out.stdout


@pytest.fixture(scope="module")
def broken_voice(tmp_path_factory: pytest.TempPathFactory, voice_tokens: Tokens) -> Iterator[ServiceProcess]:
    proc = voice_process(
        Path(tmp_path_factory.mktemp("voice-broken")),
        voice_tokens,
        "--fail-engines",
        "piper,espeak-ng,faster-whisper,pocketsphinx",
    ).start(timeout=90)
    yield proc
    proc.stop()


def test_all_engines_failing_is_unavailable_with_attempts_never_internal(
    broken_voice: ServiceProcess, voice_tokens: Tokens
) -> None:
    for call in ("synth", "transcribe"):
        with pytest.raises(grpc.RpcError) as ei:
            if call == "synth":
                synth(broken_voice, voice_tokens, "Hello.")
            else:
                transcribe(broken_voice, voice_tokens, _wav(16000))
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        info, _ = status_details(ei.value)
        assert info is not None and info.reason == "ALL_ENGINES_FAILED"
        engines = ("piper", "espeak-ng") if call == "synth" else ("faster-whisper", "pocketsphinx")
        assert all(info.metadata[f"engine.{e}"] == "engine_error" for e in engines), dict(info.metadata)
        assert "fault injected" in info.metadata["attempts"]


def test_piper_broken_service_falls_back_to_espeak(tmp_path: Path, voice_tokens: Tokens) -> None:
    config = "tts: {engines: [piper, espeak-ng], deadline: 4s}\n"
    proc = voice_process(tmp_path, voice_tokens, "--hang-engines", "piper", config_yaml=config).start(
        timeout=90
    )
    try:
        r = synth(proc, voice_tokens, "Piper is stuck, espeak speaks.")
        assert r.engine == "espeak-ng"
        assert [(a.engine, a.ok, a.cause) for a in r.attempts] == [
            ("piper", False, "timeout"),
            ("espeak-ng", True, ""),
        ]
        assert inspect_wav(r.audio_content).voiced_fraction > 0.3
        # The caller's deadline (shorter than tts.deadline) bounds the chain: the caller gets audio or
        # ALL_ENGINES_FAILED with the attempts, never DEADLINE_EXCEEDED.
        with voice_stub(proc.address, "") as stub:
            try:
                r2 = stub.Synthesize(
                    voice_pb2.SynthesizeRequest(text="Quick."), metadata=md(voice_tokens), timeout=1.5
                )
                assert r2.engine == "espeak-ng" and r2.attempts[0].cause == "timeout"
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE, e
                info, _ = status_details(e)
                assert info is not None and info.reason == "ALL_ENGINES_FAILED"
                assert info.metadata["engine.piper"] == "timeout"
    finally:
        proc.stop()


def test_gpl_code_stays_out_of_the_service_process(voice_svc: ServiceProcess, voice_tokens: Tokens) -> None:
    """piper (GPL), espeak-ng (GPL) and FFmpeg builds (GPL, via PyAV or the CLI) run in other processes."""
    synth(
        voice_svc,
        voice_tokens,
        "Load everything once.",
        audio_config=voice_pb2.AudioConfig(encoding=common_pb2.AUDIO_ENCODING_MP3),
    )
    transcribe(voice_svc, voice_tokens, _wav(16000))
    assert voice_svc.proc is not None
    maps = Path(f"/proc/{voice_svc.proc.pid}/maps").read_text()
    for lib in ("espeakbridge", "libespeak", "libavcodec", "libavformat", "onnxruntime"):
        assert lib not in maps, lib


def _metrics(proc: ServiceProcess) -> str:
    import urllib.request

    metrics_port = int((proc.data_dir / ".voice.port").read_text().split()[1])
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
        return str(resp.read().decode())


def test_metrics_by_engine_and_cause(
    voice_svc: ServiceProcess, broken_voice: ServiceProcess, voice_tokens: Tokens
) -> None:
    synth(voice_svc, voice_tokens, "Counted.")
    transcribe(voice_svc, voice_tokens, _wav(16000), engines=["pocketsphinx"])
    text = _metrics(voice_svc)
    assert 'voice_synthesis_seconds_count{engine="piper"}' in text
    assert 'voice_synthesis_real_time_factor_count{engine="piper"}' in text
    assert 'voice_transcription_real_time_factor_count{engine="pocketsphinx"}' in text
    assert 'voice_requests_total{method="Synthesize",outcome="ok"}' in text
    with pytest.raises(grpc.RpcError):
        synth(broken_voice, voice_tokens, "Fails.")
    broken = _metrics(broken_voice)
    assert 'voice_engine_failures_total{cause="engine_error",engine="piper",kind="tts"}' in broken
    assert 'voice_all_engines_failed_total{kind="tts"}' in broken
