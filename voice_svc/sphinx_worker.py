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

import json
import sys
import time

from voice_svc.worker_process import send_frame, worker_stdout


def main() -> None:
    out = worker_stdout()
    from pocketsphinx import Decoder  # type: ignore[import-untyped]

    decoder = Decoder(samprate=16000, logfn="/dev/null")
    send_frame(out, {"ready": True, "model": "en-us"})
    stdin = sys.stdin.buffer
    while True:
        line = stdin.readline()
        if not line:
            return
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            audio = stdin.read(int(req.get("bytes", 0)))
            fault = req.get("fault", "")
            if fault == "hang":
                while True:
                    time.sleep(3600)
            if fault == "fail":
                send_frame(out, {"error": "fault injected: pocketsphinx made to fail"})
                continue
            decoder.start_utt()
            decoder.process_raw(audio, no_search=False, full_utt=True)
            decoder.end_utt()
            hyp = decoder.hyp()
            # pocketsphinx gives no calibrated confidence
            send_frame(out, {"text": hyp.hypstr if hyp is not None else "", "confidence": 0.0})
            send_frame(out, {"done": True})
        except Exception as e:  # one bad request must not kill the warm worker
            send_frame(out, {"error": f"{type(e).__name__}: {e}"})


if __name__ == "__main__":
    main()
