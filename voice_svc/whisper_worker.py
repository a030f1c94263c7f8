"""faster-whisper in its own process: python -m voice_svc.whisper_worker --model DIR.

faster-whisper imports PyAV, whose wheel bundles an FFmpeg build with GPL parts; running it here
keeps that out of the service's address space, and a decode that overruns its deadline is ended
by killing this process (a thread could not be interrupted). Protocol (voice_svc.worker_process):

  worker -> {"ready": true, "model": NAME}\n
  parent -> {"bytes": N, "language": "en", "fault": ""}\n + N bytes of 16 kHz mono 16-bit LE PCM
  worker -> {"text": "...", "confidence": C}\n then {"done": true}\n   (or {"error": "..."}\n)
"""

from __future__ import annotations

import argparse
import math

from voice_svc.worker_process import send_frame, serve_transcriptions, worker_stdout

CPU_THREADS = 2


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    args = p.parse_args()
    out = worker_stdout()

    import numpy as np
    from faster_whisper import WhisperModel  # type: ignore[import-untyped]

    model = WhisperModel(args.model, device="cpu", compute_type="int8", cpu_threads=CPU_THREADS)

    def transcribe(audio: bytes) -> tuple[str, float]:
        floats = np.frombuffer(audio, dtype="<i2").astype(np.float32) / 32768.0
        segments, _info = model.transcribe(floats, language="en", beam_size=1, vad_filter=False)
        parts, logprobs = [], []
        for seg in segments:
            parts.append(seg.text.strip())
            logprobs.append(seg.avg_logprob)
        confidence = math.exp(sum(logprobs) / len(logprobs)) if logprobs else 0.0
        return " ".join(t for t in parts if t), max(0.0, min(1.0, confidence))

    send_frame(out, {"ready": True, "model": "tiny.en"})
    serve_transcriptions(out, "faster-whisper", transcribe)


if __name__ == "__main__":
    main()
