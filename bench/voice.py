"""Voice figures: per engine time to first audio chunk and real-time factor (TTS and STT), and the
text-delivery latency of a reply when TTS hangs (measured through run control).

    .venv/bin/python -m bench.voice [--runs 10] [--hang-runs 8] [--deadline 1.0]

Starts real processes on loopback: a voice service (fixed config), and for the hang figure a config
service + run control + a voice service whose engines all hang (--hang-engines piper,espeak-ng).
Delivery latency = time StreamReplies hands the final reply to the client - the reply's create_time
(written when the run's final text is durable); the target is tts.deadline + <= 50 ms.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
import wave
from pathlib import Path

import grpc
from flynn.v1 import run_control_pb2 as rc_pb2
from flynn.v1 import run_control_pb2_grpc, voice_pb2, voice_pb2_grpc

from flynn_runtime.timestamps import seconds_of
from tests.support.mesh import ServiceProcess, free_port, make_tokens
from tests.support.voice import voice_process

TEXT = "Your package was delivered this afternoon. It is waiting at the front door."
STT_TEXT = "Please remind me to call my sister at six in the evening."


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def fmt(name: str, values: list[float], unit: str = "ms", scale: float = 1000.0) -> str:
    v = [x * scale for x in values]
    d = 1 if unit == "ms" else 3
    return (
        f"{name:<52} n={len(v):<3} p50={pct(v, 0.5):8.{d}f}{unit} p95={pct(v, 0.95):8.{d}f}{unit} "
        f"p99={pct(v, 0.99):8.{d}f}{unit} max={max(v):8.{d}f}{unit}"
    )


def bench_engines(root: Path, runs: int) -> None:
    tokens = make_tokens(root)
    proc = voice_process(root / "voice", tokens).start(timeout=120)
    md = tokens.md("service")
    try:
        with grpc.insecure_channel(
            proc.address, options=[("grpc.max_receive_message_length", 64 << 20)]
        ) as ch:
            stub = voice_pb2_grpc.VoiceStub(ch)
            wav16 = b""
            for engine in ("piper", "espeak-ng"):
                ttfa, rtf = [], []
                for _ in range(runs):
                    t0 = time.perf_counter()
                    first = None
                    for _chunk in stub.StreamSynthesize(
                        voice_pb2.StreamSynthesizeRequest(text=TEXT, engines=[engine]),
                        metadata=md,
                        timeout=60,
                    ):
                        if first is None:
                            first = time.perf_counter() - t0
                    assert first is not None
                    ttfa.append(first)
                    t0 = time.perf_counter()
                    r = stub.Synthesize(
                        voice_pb2.SynthesizeRequest(text=TEXT, engines=[engine]), metadata=md, timeout=60
                    )
                    rtf.append((time.perf_counter() - t0) / (r.duration_ms / 1000))
                print(fmt(f"tts {engine}: time to first audio chunk", ttfa))
                print(fmt(f"tts {engine}: real-time factor (Synthesize)", rtf, unit="x", scale=1.0))
            wav16 = stub.Synthesize(
                voice_pb2.SynthesizeRequest(text=STT_TEXT, engines=["piper"], audio_config=voice_pb2.AudioConfig(sample_rate_hertz=16000)),
                metadata=md, timeout=60,
            ).audio_content  # fmt: skip
            with wave.open(io.BytesIO(wav16)) as w:
                seconds = w.getnframes() / w.getframerate()
            for engine in ("faster-whisper", "pocketsphinx"):
                lat = []
                for _ in range(max(3, runs // 2)):
                    t0 = time.perf_counter()
                    stub.Transcribe(
                        voice_pb2.TranscribeRequest(audio_content=wav16, config=voice_pb2.RecognitionConfig(engines=[engine])),
                        metadata=md, timeout=120,
                    )  # fmt: skip
                    lat.append(time.perf_counter() - t0)
                print(fmt(f"stt {engine}: latency ({seconds:.1f}s audio)", lat))
                print(fmt(f"stt {engine}: real-time factor", [x / seconds for x in lat], unit="x", scale=1.0))
    finally:
        proc.stop()


def bench_hang_delivery(root: Path, runs: int, deadline: float) -> None:
    tokens = make_tokens(root)
    seed = root / "seed.yaml"
    seed.write_text(
        "server: {queue: {mode: collect, quiet_window: 1ms}, agent: {think_time: 0s, chunks: 1}}\n"
        f"tts: {{enabled: true, enabled_channels: [voice], engines: [piper, espeak-ng], deadline: {int(deadline * 1000)}ms}}\n"
    )
    config = ServiceProcess(
        "config", "config_svc.main", root / "config", tokens, extra=["--seed-file", str(seed)]
    ).start()
    voice_port = free_port()
    voice = queue = None
    try:
        voice = ServiceProcess(
            "voice", "voice_svc.main", root / "voice", tokens, port=voice_port,
            addresses={"config": config.address}, extra=["--hang-engines", "piper,espeak-ng"],
        ).start(timeout=120)  # fmt: skip
        queue = ServiceProcess(
            "queue", "queue_svc.main", root / "queue", tokens,
            addresses={"config": config.address, "voice": f"127.0.0.1:{voice_port}"},
        ).start()  # fmt: skip
        md = tokens.md("operator")
        for label, channel in (
            ("text only (tts off for channel)", "plain"),
            ("tts hanging -> text after fallback", "voice"),
        ):
            with grpc.insecure_channel(queue.address) as ch:
                rc = run_control_pb2_grpc.RunControlStub(ch)
                lat: list[float] = []
                modes: dict[str, int] = {}
                stream = rc.StreamReplies(
                    rc_pb2.StreamRepliesRequest(channels=[channel]),
                    metadata=md,
                    timeout=runs * (deadline + 5) + 30,
                )
                for i in range(runs):
                    s = f"{channel}:bench-{time.monotonic_ns()}-{i}"
                    rc.SubmitMessage(
                        rc_pb2.SubmitMessageRequest(session_key=s, channel=channel, sender="b", text="hi", idempotency_key=s),
                        metadata=md, timeout=10,
                    )  # fmt: skip
                    for resp in stream:
                        r = resp.reply
                        if r.kind == rc_pb2.REPLY_KIND_FINAL and r.session_key == s:
                            lat.append(time.time() - seconds_of(r.create_time))
                            mode = rc_pb2.DeliveryMode.Name(r.delivery)
                            key = f"{mode}({r.tts_fallback_reason})" if r.tts_fallback_reason else mode
                            modes[key] = modes.get(key, 0) + 1
                            break
                stream.cancel()  # type: ignore[no-untyped-call]
                print(fmt(f"delivery latency, {label}", lat) + f"  modes={modes}")
                if channel == "voice":
                    over = [x - deadline for x in lat]
                    print(fmt(f"  ... minus tts.deadline ({deadline * 1000:.0f} ms)", over))
    finally:
        for p in (queue, voice, config):
            if p is not None:
                p.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--hang-runs", type=int, default=8)
    ap.add_argument("--deadline", type=float, default=1.0, help="tts.deadline for the hang figure (seconds)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-voice-") as tmp:
        root = Path(tmp)
        bench_engines(root / "engines", args.runs)
        bench_hang_delivery(root / "hang", args.hang_runs, args.deadline)


if __name__ == "__main__":
    main()
