"""Voice metrics: latency and real-time factor by engine, failures by engine and cause, requests."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 60.0)
_RTF = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0)

REQUESTS = Counter(
    "voice_requests_total",
    "Voice requests by method and outcome (ok, fallback_exhausted, invalid).",
    ["method", "outcome"],
)
SYNTH_SECONDS = Histogram(
    "voice_synthesis_seconds", "Time an engine took to synthesize a request.", ["engine"], buckets=_SECONDS
)
SYNTH_FIRST_CHUNK_SECONDS = Histogram(
    "voice_synthesis_first_chunk_seconds",
    "Time to the first audio chunk of a streamed synthesis.",
    ["engine"],
    buckets=_SECONDS,
)
SYNTH_RTF = Histogram(
    "voice_synthesis_real_time_factor", "Synthesis time divided by audio duration.", ["engine"], buckets=_RTF
)
TRANSCRIBE_SECONDS = Histogram(
    "voice_transcription_seconds", "Time an engine took to transcribe.", ["engine"], buckets=_SECONDS
)
TRANSCRIBE_RTF = Histogram(
    "voice_transcription_real_time_factor",
    "Transcription time divided by audio duration.",
    ["engine"],
    buckets=_RTF,
)
ENGINE_FAILURES = Counter(
    "voice_engine_failures_total",
    "Engine attempts that failed, by kind (tts/stt), engine and cause.",
    ["kind", "engine", "cause"],
)
CHAIN_EXHAUSTED = Counter(
    "voice_all_engines_failed_total", "Requests for which every engine of the chain failed.", ["kind"]
)
