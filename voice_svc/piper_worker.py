"""Piper TTS in its own process (piper-tts is GPL-3.0: it stays behind this process boundary).

Run as `python -m voice_svc.piper_worker --model M.onnx --config M.onnx.json`. Protocol
(voice_svc.worker_process), one request at a time:

  worker -> {"ready": true, "sample_rate": R, "voice": NAME}\n           once, after loading
  parent -> {"sentences": [...], "length_scale": 1.0, "fault": ""}\n    a request
  worker -> {"chunk": i, "bytes": N}\n + N bytes of 16-bit LE mono PCM  per sentence
  worker -> {"done": true}\n   or   {"error": "..."}\n                  end of the request

`fault` is the fault-injection switch: "fail" answers an error, "hang" never answers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from voice_svc.worker_process import send_frame, worker_stdout


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--config", required=True)
    args = p.parse_args()
    out = worker_stdout()

    from piper import PiperVoice, SynthesisConfig

    voice = PiperVoice.load(args.model, args.config)
    name = os.path.basename(args.model).removesuffix(".onnx")
    for _ in voice.synthesize("Ready."):  # the first inference is slow; pay it before saying ready
        pass
    send_frame(out, {"ready": True, "sample_rate": voice.config.sample_rate, "voice": name})
    for line in sys.stdin.buffer:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            fault = req.get("fault", "")
            if fault == "hang":
                while True:
                    time.sleep(3600)
            if fault == "fail":
                send_frame(out, {"error": "fault injected: piper made to fail"})
                continue
            syn = SynthesisConfig(length_scale=float(req.get("length_scale", 1.0)))
            for i, sentence in enumerate(req["sentences"]):
                pcm = b"".join(c.audio_int16_bytes for c in voice.synthesize(sentence, syn_config=syn))
                send_frame(out, {"chunk": i, "bytes": len(pcm)}, pcm)
            send_frame(out, {"done": True})
        except Exception as e:  # one bad request must not kill the warm worker
            send_frame(out, {"error": f"{type(e).__name__}: {e}"})


if __name__ == "__main__":
    main()
