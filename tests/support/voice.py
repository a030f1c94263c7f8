"""Test support for voice: WAV inspection, word error rate, a voice service process, error details."""

from __future__ import annotations

import io
import re
import wave
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from flynn.v1 import voice_pb2_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.support.mesh import ServiceProcess, Tokens, free_port


@dataclass(frozen=True)
class WavFacts:
    rate: int
    channels: int
    width: int
    frames: int
    peak: int
    voiced_fraction: float  # share of 20 ms windows whose RMS is above a silence floor

    @property
    def duration_s(self) -> float:
        return self.frames / self.rate


def inspect_pcm(pcm: bytes, rate: int, channels: int = 1, width: int = 2) -> WavFacts:
    a = np.frombuffer(pcm[: len(pcm) // 2 * 2], dtype="<i2").astype(np.float64)
    win = max(1, rate // 50)
    n = len(a) // win
    rms = np.sqrt((a[: n * win].reshape(n, win) ** 2).mean(axis=1)) if n else np.zeros(0)
    voiced = float((rms > 300).mean()) if n else 0.0
    peak = int(np.abs(a).max()) if len(a) else 0
    return WavFacts(rate, channels, width, len(a) // channels, peak, voiced)


def inspect_wav(data: bytes) -> WavFacts:
    """Parse the RIFF header with the stdlib (raises on a malformed WAV) and measure the samples."""
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE", data[:16]
    with wave.open(io.BytesIO(data), "rb") as w:
        rate, ch, width, n = w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()
        frames = w.readframes(n)
    assert len(frames) == n * ch * width, "WAV header size does not match its data"
    return inspect_pcm(frames, rate, ch, width)


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Levenshtein distance over words divided by the reference length."""
    ref, hyp = words(reference), words(hypothesis)
    d = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, d[0] = d[0], i
        for j, h in enumerate(hyp, 1):
            cur = min(d[j] + 1, d[j - 1] + 1, prev + (r != h))
            prev, d[j] = d[j], cur
    return d[len(hyp)] / max(1, len(ref))


def status_details(e: grpc.RpcError) -> tuple[error_details_pb2.ErrorInfo | None, list[str]]:
    """ErrorInfo and BadRequest field names carried by a rich status."""
    status = rpc_status.from_call(e)  # type: ignore[arg-type]
    info, fields = None, []
    if status is not None:
        for d in status.details:
            if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                d.Unpack(info)
            elif d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                br = error_details_pb2.BadRequest()
                d.Unpack(br)
                fields += [v.field for v in br.field_violations]
    return info, fields


# Generous deadlines: these tests check what engines produce, not how fast (2 shared cores).
TEST_CONFIG = """
tts: {engines: [piper, espeak-ng], deadline: 30s}
audio: {engines: [faster-whisper, pocketsphinx], deadline: 60s}
"""


def voice_process(
    data_dir: Path, tokens: Tokens, *extra: str, config_yaml: str = TEST_CONFIG
) -> ServiceProcess:
    """A voice service process on a fixed YAML config (it follows no config service)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    cfg = data_dir / "voice-config.yaml"
    cfg.write_text(config_yaml)
    return ServiceProcess(
        "voice",
        "voice_svc.main",
        data_dir,
        tokens,
        addresses={"config": f"127.0.0.1:{free_port()}"},
        extra=["--voice-config-file", str(cfg), *extra],
    )


@contextmanager
def voice_stub(address: str, token: str) -> Iterator[voice_pb2_grpc.VoiceStub]:
    with grpc.insecure_channel(
        address,
        options=[("grpc.max_receive_message_length", 32 << 20), ("grpc.max_send_message_length", 32 << 20)],
    ) as ch:
        yield voice_pb2_grpc.VoiceStub(ch)
