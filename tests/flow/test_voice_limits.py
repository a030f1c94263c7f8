"""Voice notes an attacker could use to exhaust the mesh, through the real gateway (issue 15):
a 3-hour 8 kbps MP3 and an 11-minute WAV are refused within 1 s naming the field (the default cap is
300 s), and 256 replays of one voice note write one canvas version. The audio is made by sox/ffmpeg
here (about 10 MB each on disk, in the test's temporary directory)."""

from __future__ import annotations

import hashlib
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from flynn.v1 import canvas_pb2, canvas_pb2_grpc, common_pb2, gateway_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from flynn_runtime.audio_probe import DEFAULT_MAX_SECONDS
from tests.support.flow import FlowMesh
from tests.support.mesh import as_call

REPLAYS = 256


def _bad_request(err: grpc.RpcError) -> list[str]:
    """Every BadRequest violation as "field: description"."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    out: list[str] = []
    for d in status.details if status is not None else ():
        if d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            d.Unpack(br)
            out += [f"{v.field}: {v.description}" for v in br.field_violations]
    return out


def _refused_quickly(mesh: FlowMesh, key: str, audio: common_pb2.Audio) -> tuple[float, grpc.RpcError]:
    # Warm the connection first, so the measurement is the gateway's answer, not the TCP handshake.
    mesh.all_serving()
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as ei:
        mesh.send("cli:long-note", "", key, audio=audio)
    return time.monotonic() - start, ei.value


def test_three_hour_mp3_is_refused_within_a_second_naming_the_field(mesh: FlowMesh, tmp_path: Path) -> None:
    path = tmp_path / "3h.mp3"
    subprocess.run(
        ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "anullsrc=r=8000:cl=mono",
         "-t", "10800", "-c:a", "libmp3lame", "-b:a", "8k", str(path)],
        check=True, timeout=120,
    )  # fmt: skip
    audio = common_pb2.Audio(encoding=common_pb2.AUDIO_ENCODING_MP3, content=path.read_bytes())
    elapsed, err = _refused_quickly(mesh, "long-mp3", audio)
    assert as_call(err).code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = _bad_request(err)
    assert any(v.startswith("audio.content:") and "10800 s of audio" in v for v in violations), violations
    assert f"at most {DEFAULT_MAX_SECONDS} s" in " ".join(violations)
    assert elapsed < 1.0, elapsed


def test_eleven_minute_wav_is_refused_within_a_second_naming_the_field(
    mesh: FlowMesh, tmp_path: Path
) -> None:
    path = tmp_path / "11min.wav"
    subprocess.run(
        ["sox", "-n", "-r", "8000", "-c", "1", "-b", "16", str(path), "synth", "660", "sine", "440", "vol", "0.1"],
        check=True, timeout=120,
    )  # fmt: skip
    audio = common_pb2.Audio(encoding=common_pb2.AUDIO_ENCODING_LINEAR16, content=path.read_bytes())
    elapsed, err = _refused_quickly(mesh, "long-wav", audio)
    assert as_call(err).code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = _bad_request(err)
    assert any(v.startswith("audio.content:") and "660 s of audio" in v for v in violations), violations
    assert elapsed < 1.0, elapsed


def test_voice_service_refuses_long_audio_from_the_header_before_decoding(
    mesh: FlowMesh, tmp_path: Path
) -> None:
    """Under the gateway's size limit but over the duration cap: the voice service's own check."""
    from flynn.v1 import voice_pb2, voice_pb2_grpc

    path = tmp_path / "6min.ogg"
    subprocess.run(
        ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "sine=f=300:r=48000",
         "-t", "360", "-c:a", "libopus", "-b:a", "8k", str(path)],
        check=True, timeout=120,
    )  # fmt: skip
    with grpc.insecure_channel(mesh.procs["voice"].address) as ch:
        stub = voice_pb2_grpc.VoiceStub(ch)
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as ei:
            stub.Transcribe(
                voice_pb2.TranscribeRequest(
                    audio_content=path.read_bytes(),
                    config=voice_pb2.RecognitionConfig(encoding=common_pb2.AUDIO_ENCODING_OGG_OPUS),
                ),
                metadata=mesh.md("service"),
                timeout=30,
            )
        elapsed = time.monotonic() - start
    assert as_call(ei.value).code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = _bad_request(ei.value)
    assert any(v.startswith("audio_content:") and "360 s of audio" in v for v in violations), violations
    assert elapsed < 1.0, elapsed


def spoken_wav(text: str, tmp: Path) -> bytes:
    out = tmp / "note.wav"
    subprocess.run(["espeak-ng", "-s", "140", "-w", str(out), text], check=True, timeout=30)
    return out.read_bytes()


def test_256_replays_of_one_voice_note_write_one_canvas_version(mesh: FlowMesh, tmp_path: Path) -> None:
    content = spoken_wav("replay me", tmp_path)
    audio = common_pb2.Audio(encoding=common_pb2.AUDIO_ENCODING_LINEAR16, content=content)
    req = gateway_pb2.SendMessageRequest(
        channel="cli", session_key="cli:replay", sender="tester", idempotency_key="replay-1", audio=audio
    )
    stub = mesh.gw()

    def send(_: int) -> gateway_pb2.SendMessageResponse:
        resp: gateway_pb2.SendMessageResponse = stub.SendMessage(req, metadata=mesh.md(), timeout=120)
        return resp

    with ThreadPoolExecutor(16) as pool:  # bounded: 256 calls, 16 at a time, then one more alone
        answers = list(pool.map(send, range(REPLAYS - 1)))
    answers.append(send(REPLAYS))
    assert len({a.message_id for a in answers}) == 1
    assert len({a.transcript for a in answers}) == 1
    canvas = canvas_pb2_grpc.CanvasStub(mesh.channel())
    name = "inbound/cli_replay-" + hashlib.sha256(b"cli:replay").hexdigest()[:12] + "/replay-1"
    art = canvas.GetArtifact(
        canvas_pb2.GetArtifactRequest(name=name), metadata=mesh.md("operator"), timeout=10
    ).artifact
    assert art.version == 1, art.version
    assert art.sha256 == hashlib.sha256(content).hexdigest()
