"""An abandoned pocketsphinx decode is killed (issue 18 item 4).

2.7 minutes of audio on pocketsphinx with a 5 s deadline: the caller gets its error at the deadline,
the worker that was decoding is killed at once (it used to run on for about a minute in a thread),
and the next request is not stuck behind it.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import grpc
import pytest
from flynn.v1 import common_pb2, voice_pb2

from tests.support.mesh import ServiceProcess, Tokens, as_call
from tests.support.voice import voice_stub

WORKER_MODULE = "voice_svc.sphinx_worker"


def sphinx_workers(parent: int) -> set[int]:
    """Pids of the voice service's pocketsphinx worker processes."""
    found = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            status = (proc / "status").read_text()
        except OSError:
            continue
        ppid = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:")), 0)
        if ppid == parent and WORKER_MODULE in cmdline:
            found.add(int(proc.name))
    return found


def wait_for(pred, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # bounded
        value = pred()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def pcm(tmp: Path, seconds: float, name: str) -> bytes:
    out = tmp / name
    subprocess.run(
        ["sox", "-n", "-r", "16000", "-c", "1", "-b", "16", "-e", "signed", "-t", "raw", str(out),
         "synth", str(seconds), "pinknoise", "vol", "0.3"],
        check=True, timeout=60,
    )  # fmt: skip
    return out.read_bytes()


def transcribe(address: str, tokens: Tokens, audio: bytes, timeout: float) -> voice_pb2.TranscribeResponse:
    with voice_stub(address, "") as stub:
        resp: voice_pb2.TranscribeResponse = stub.Transcribe(
            voice_pb2.TranscribeRequest(
                audio_content=audio,
                config=voice_pb2.RecognitionConfig(
                    encoding=common_pb2.AUDIO_ENCODING_LINEAR16,
                    sample_rate_hertz=16000,
                    engines=["pocketsphinx"],
                ),
            ),
            metadata=tokens.md("service"),
            timeout=timeout,
        )
    return resp


def test_abandoned_pocketsphinx_decode_is_killed_and_the_next_request_runs(
    voice_svc: ServiceProcess, voice_tokens: Tokens, tmp_path: Path
) -> None:
    assert voice_svc.proc is not None
    parent = voice_svc.proc.pid
    # Warm: the worker is loaded and has answered once.
    short = pcm(tmp_path, 1.0, "short.raw")
    transcribe(voice_svc.address, voice_tokens, short, timeout=60)
    before = wait_for(lambda: sphinx_workers(parent), 30, "a pocketsphinx worker")
    long = pcm(tmp_path, 162.0, "long.raw")  # 2.7 minutes, 5.2 MB: under the size and duration caps
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as ei:
        transcribe(voice_svc.address, voice_tokens, long, timeout=5)
    assert as_call(ei.value).code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
    assert time.monotonic() - start < 10
    # The decoding worker is gone (killed), a fresh one stands in.
    wait_for(lambda: not (sphinx_workers(parent) & before), 5, "the abandoned decode's worker to be killed")
    # The next request is served by the fresh worker, not queued behind a minute of decoding.
    start = time.monotonic()
    transcribe(voice_svc.address, voice_tokens, short, timeout=20)
    print(f"next 1 s request answered {time.monotonic() - start:.2f} s after the abandoned one")
