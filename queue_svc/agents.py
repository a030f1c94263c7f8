"""The agent interface run control drives, and the default in-process deterministic agent.

An agent run is opened with its inputs and a set of hooks; it streams chunks through
`hooks.on_chunk`, may take steer inputs, honours `cancel()` promptly, and its `result()` is one
Outcome. The built-in agent's output is a pure function of its input texts:

    "echo: " + " | ".join(texts taken, inputs first then steered texts in order)

so tests can assert exact sequences. Steering lengthens the text by appending, so output already
streamed is always a prefix of the final text.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class AgentInput:
    message_id: str
    sender: str
    text: str
    #: The message's causation (serialized), kept with it so a run made of it needs no store read.
    causation: bytes = field(default=b"", repr=False, compare=False)


@dataclass(frozen=True)
class RunSpec:
    run_id: str
    session_key: str
    channel: str
    inputs: tuple[AgentInput, ...]
    attempt: int
    deadline: float  # absolute, time.time() seconds


@dataclass(frozen=True)
class Final:
    text: str


@dataclass(frozen=True)
class Failure:
    kind: str
    message: str = ""


@dataclass(frozen=True)
class Cancelled:
    forced: bool = False


Outcome = Final | Failure | Cancelled


@dataclass
class AgentHooks:
    """Callbacks into run control, called synchronously on the event loop in stream order."""

    on_chunk: Callable[[str], None]
    # (accepted, message ids) answering an offer_steer that returned None (asynchronous agents).
    on_steer_result: Callable[[bool, list[str]], None] = field(default=lambda _a, _ids: None)


class AgentRun(Protocol):
    def offer_steer(self, inputs: list[AgentInput]) -> bool | None:
        """True: taken at the next boundary; False: cannot (fall back to followup); None: answer comes later."""

    def cancel(self, reason: str) -> None:
        """Ask the agent to stop (cooperative)."""

    async def result(self) -> Outcome:
        """Wait for the end of the run. Cancelling this awaitable stops the run forcibly."""


class Agent(Protocol):
    def open(self, spec: RunSpec, hooks: AgentHooks) -> AgentRun: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class EchoSettings:
    think_time: float = 0.0
    chunks: int = 1
    chunk_interval: float = 0.0


def echo_text(texts: list[str]) -> str:
    return "echo: " + " | ".join(texts)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _EchoRun:
    def __init__(self, spec: RunSpec, hooks: AgentHooks, settings: EchoSettings) -> None:
        self._spec = spec
        self._hooks = hooks
        self._settings = settings
        self._texts = [i.text for i in spec.inputs]
        self._pending: list[AgentInput] = []
        self._closed = False  # past the last boundary: steering is refused
        self._cancel = asyncio.Event()
        self._waiter: asyncio.Future[None] | None = None
        self._task = asyncio.ensure_future(self._main())

    def offer_steer(self, inputs: list[AgentInput]) -> bool | None:
        if self._closed or self._cancel.is_set():
            return False
        self._pending.extend(inputs)
        return True

    def cancel(self, reason: str) -> None:
        self._cancel.set()
        if self._waiter is not None:
            _wake(self._waiter)

    async def result(self) -> Outcome:
        try:
            return await asyncio.shield(self._task)
        except asyncio.CancelledError:
            self._task.cancel()
            raise

    async def _pause(self, seconds: float) -> bool:
        """Sleep unless cancelled first; True when cancelled. One future and one timer (no tasks):
        this runs for every chunk of every streaming run."""
        if self._cancel.is_set():
            return True
        if seconds <= 0:
            return False
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        timer = loop.call_later(seconds, _wake, self._waiter)
        try:
            await self._waiter
        finally:
            timer.cancel()
            self._waiter = None
        return self._cancel.is_set()

    async def _main(self) -> Outcome:
        s = self._settings
        if await self._pause(s.think_time):
            return Cancelled()
        chunks = max(s.chunks, 1)
        emitted = 0
        for i in range(chunks):
            if self._cancel.is_set():
                return Cancelled()
            # A boundary: take steer inputs offered since the last one.
            if self._pending:
                self._texts.extend(p.text for p in self._pending)
                self._pending.clear()
            text = echo_text(self._texts)
            remaining = chunks - i
            if i == chunks - 1:
                self._closed = True
            size = -(-(len(text) - emitted) // remaining)
            piece = text[emitted : emitted + size] if i < chunks - 1 else text[emitted:]
            emitted += len(piece)
            self._hooks.on_chunk(piece)
            if i < chunks - 1 and await self._pause(s.chunk_interval):
                return Cancelled()
        self._closed = True
        return Final(echo_text(self._texts))


class EchoAgent:
    """The default agent: deterministic, streamed, steerable, cancellable. Settings are read per run."""

    def __init__(self, settings: Callable[[], EchoSettings]) -> None:
        self._settings = settings

    def open(self, spec: RunSpec, hooks: AgentHooks) -> AgentRun:
        return _EchoRun(spec, hooks, self._settings())

    async def close(self) -> None:
        return None
