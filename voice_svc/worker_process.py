"""A warm helper process spoken to over stdin/stdout, one request at a time.

Engines whose code must stay out of the service's address space (GPL piper; faster-whisper, which
loads PyAV's FFmpeg build) run in such a worker. The worker says {"ready": ...} once loaded; a
request is one JSON line plus optional bytes; the answer is frames — a JSON line, followed by
`bytes` raw bytes when it names them — ending with {"done": true} or {"error": "..."}.

The worker is started at service start and waited for (bounded), restarted when it dies, and killed
when a request is cancelled or times out half-way (its output is then unknown); a fresh one is
started right away so the next request finds it warm.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

from voice_svc.engines import ENGINE_ERROR, UNAVAILABLE, EngineFailure

log = logging.getLogger(__name__)

_PROJECT_ROOT = str(Path(__file__).resolve().parents[1])


class WorkerProcess:
    def __init__(self, name: str, module: str, args: list[str], start_timeout: float = 60.0) -> None:
        self.name = name
        self._argv = [sys.executable, "-m", module, *args]
        self._start_timeout = start_timeout
        self._proc: asyncio.subprocess.Process | None = None
        self._ready: asyncio.Future[dict[str, Any]] | None = None
        self._lock = asyncio.Lock()
        self._closed = False
        self.restarts = 0
        self.hello: dict[str, Any] = {}

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    async def start(self, wait: bool = True) -> None:
        """Start the worker; with `wait`, until it is loaded (bounded), so the first request is warm."""
        self._spawn()
        assert self._ready is not None
        if not wait:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), self._start_timeout)
        except Exception as e:  # the chain falls back to the next engine; requests retry the start
            log.warning("worker not ready at start", extra={"worker": self.name, "error": str(e)})

    def _spawn(self) -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[dict[str, Any]] = loop.create_future()
        ready.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)
        self._ready = ready

        async def launch() -> None:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *self._argv,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    cwd=_PROJECT_ROOT,
                )
                self._proc = proc
                assert proc.stdout is not None
                line = await asyncio.wait_for(proc.stdout.readline(), self._start_timeout)
                hello = json.loads(line) if line else {}
                if not hello.get("ready"):
                    raise RuntimeError(f"exited before ready (code {proc.returncode})")
                self.hello = hello
                if not ready.done():
                    ready.set_result(hello)
            except Exception as e:
                log.warning("worker failed to start", extra={"worker": self.name, "error": str(e)})
                if not ready.done():
                    ready.set_exception(
                        EngineFailure(ENGINE_ERROR, f"{self.name} worker failed to start: {e}")
                    )

        task = loop.create_task(launch())
        task.add_done_callback(lambda t: None)

    async def _ensure(self) -> asyncio.subprocess.Process:
        if self._closed:
            raise EngineFailure(UNAVAILABLE, f"{self.name} worker is closed")
        if self._proc is not None and self._proc.returncode is not None:
            log.warning(
                "worker died; restarting", extra={"worker": self.name, "returncode": self._proc.returncode}
            )
            self._proc, self._ready = None, None
            self.restarts += 1
        if self._ready is None:
            self._spawn()
        assert self._ready is not None
        await asyncio.shield(self._ready)
        if self._proc is None or self._proc.returncode is not None:
            self._ready = None
            raise EngineFailure(ENGINE_ERROR, f"{self.name} worker is not running")
        return self._proc

    def kill(self, why: str) -> None:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            log.warning("killing worker", extra={"worker": self.name, "why": why, "pid": proc.pid})
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        self._proc, self._ready = None, None
        self.restarts += 1
        if not self._closed:
            self._spawn()  # warm again before the next request needs it

    async def exchange(
        self, request: dict[str, Any], payload: bytes = b""
    ) -> AsyncGenerator[tuple[dict[str, Any], bytes], None]:
        """Send one request; yield its frames until done. Raises EngineFailure on error frames."""
        async with self._lock:
            proc = await self._ensure()
            assert proc.stdin is not None and proc.stdout is not None
            complete = False
            try:
                proc.stdin.write(json.dumps(request).encode() + b"\n" + payload)
                await proc.stdin.drain()
                while True:
                    line = await proc.stdout.readline()
                    if not line:
                        raise EngineFailure(ENGINE_ERROR, f"{self.name} worker died mid-request")
                    msg = json.loads(line)
                    if "error" in msg:
                        complete = True
                        raise EngineFailure(ENGINE_ERROR, str(msg["error"]))
                    if msg.get("done"):
                        complete = True
                        return
                    data = await proc.stdout.readexactly(int(msg["bytes"])) if msg.get("bytes") else b""
                    yield msg, data
            except (ConnectionError, asyncio.IncompleteReadError, json.JSONDecodeError) as e:
                raise EngineFailure(ENGINE_ERROR, f"{self.name} worker protocol failure: {e}") from e
            finally:
                if not complete:
                    # Cancelled, timed out or abandoned half-way: the worker's output is unknown now.
                    self.kill("request not completed")

    async def close(self) -> None:
        self._closed = True
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.wait(), 5)
        self._proc = None


def worker_stdout() -> Any:
    """In a worker: the protocol's stdout (fd 1 duplicated); library prints go to stderr from now on.

    Also asks Linux to kill the worker when its parent dies, so a hung worker never outlives a
    SIGKILLed service (a live one would see EOF on stdin and exit anyway)."""
    import os
    import signal

    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(0)
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


def send_frame(out: Any, obj: dict[str, Any], payload: bytes = b"") -> None:
    out.write(json.dumps(obj).encode() + b"\n" + payload)
    out.flush()


def serve_transcriptions(out: Any, engine: str, transcribe: Callable[[bytes], tuple[str, float]]) -> None:
    """A recognition worker's request loop (stdin until EOF): each request line names the size of
    the PCM that follows and an optional injected fault; the answer is {"text", "confidence"} then
    {"done"}, or {"error"}. One bad request never ends the warm worker."""
    import time

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
                send_frame(out, {"error": f"fault injected: {engine} made to fail"})
                continue
            text, confidence = transcribe(audio)
            send_frame(out, {"text": text, "confidence": confidence})
            send_frame(out, {"done": True})
        except Exception as e:
            send_frame(out, {"error": f"{type(e).__name__}: {e}"})
