"""pocketsphinx in its own process: python -m voice_svc.sphinx_worker.

A pocketsphinx decode cannot be interrupted inside the native library. Run in a thread, an
abandoned decode (caller cancelled, deadline passed) kept burning a core for up to a minute and the
next request waited behind it. Here it is ended by killing this process (voice_svc.worker_process),
exactly as the piper and faster-whisper workers are. Protocol:

  worker -> {"ready": true, "model": "en-us"}\n
  parent -> {"bytes": N, "fault": ""}\n + N bytes of 16 kHz mono 16-bit LE PCM
  worker -> {"text": "...", "confidence": 0.0}\n then {"done": true}\n   (or {"error": "..."}\n)
"""

from __future__ import annotations

from voice_svc.worker_process import send_frame, serve_transcriptions, worker_stdout


def main() -> None:
    out = worker_stdout()
    from pocketsphinx import Decoder  # type: ignore[import-untyped]

    decoder = Decoder(samprate=16000, logfn="/dev/null")

    def transcribe(audio: bytes) -> tuple[str, float]:
        decoder.start_utt()
        decoder.process_raw(audio, no_search=False, full_utt=True)
        decoder.end_utt()
        hyp = decoder.hyp()
        return (hyp.hypstr if hyp is not None else ""), 0.0  # pocketsphinx gives no calibrated confidence

    send_frame(out, {"ready": True, "model": "en-us"})
    serve_transcriptions(out, "pocketsphinx", transcribe)


if __name__ == "__main__":
    main()
