"""An example external agent: a grpc.aio server implementing flynn.v1.Agent/Run.

Run control connects to it when `server.agent.address` is set. It answers like the built-in agent,
with its own prefix ("agent: a | b"), streams chunks, takes steer inputs at chunk boundaries (unless
started with --agent-no-steer), answers a CancelSignal with RunFailure{kind: "cancelled"} (unless
--agent-ignore-cancel, which shows run control's forced cancel), and stops at the run's deadline.

    .venv/bin/python -m examples.external_agent --listen 127.0.0.1:50060 --tokens-file tokens.yaml

Run control calls it with the agent credential (role `agent`, `--agent-token-file`; the launcher's
`.flynn-data/secrets/agent.token`, whose hash is in `.flynn-data/secrets/tokens.yaml`). That
credential is the only one `Agent/Run` accepts, and it grants nothing in the mesh, so whoever runs
an agent gets nothing from what run control sends it (docs/operations/SECURITY.md).
    # then: server.agent.address: 127.0.0.1:50060 in the Flynn config
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from flynn.v1 import agent_pb2, agent_pb2_grpc

from flynn_runtime import settings
from flynn_runtime.server import Runtime, ServiceApp, run_service


def add_args(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    p.add_argument(
        "--agent-think",
        type=float,
        default=float(env("FLYNN_AGENT_THINK", "0")),
        help="seconds before the first chunk",
    )
    p.add_argument(
        "--agent-chunks", type=int, default=int(env("FLYNN_AGENT_CHUNKS", "3")), help="chunks per answer"
    )
    p.add_argument(
        "--agent-interval",
        type=float,
        default=float(env("FLYNN_AGENT_INTERVAL", "0.05")),
        help="seconds between chunks",
    )
    p.add_argument("--agent-no-steer", action="store_true", help="declare the agent not steerable")
    p.add_argument(
        "--agent-ignore-cancel", action="store_true", help="ignore CancelSignal (shows forced cancel)"
    )


@dataclass
class AgentBehaviour:
    think: float = 0.0
    chunks: int = 3
    interval: float = 0.05
    steerable: bool = True
    ignore_cancel: bool = False


@dataclass
class Observed:
    """What the agent saw of one run (tests read it)."""

    time_remaining: float | None = None
    deadline: float = 0.0
    cancel_signal: str | None = None
    call_cancelled: bool = False
    finished: str = ""
    steered: list[str] = field(default_factory=list)


class AgentServicer(agent_pb2_grpc.AgentServicer):
    def __init__(self, behaviour: AgentBehaviour) -> None:
        self.b = behaviour
        self.observed: dict[str, Observed] = {}

    async def Run(
        self,
        request_iterator: AsyncIterator[agent_pb2.RunRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[agent_pb2.RunResponse]:
        first = await anext(aiter(request_iterator))
        if first.WhichOneof("request") != "start":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be a RunStart")
        start = first.start
        obs = Observed(time_remaining=context.time_remaining(), deadline=start.deadline.ToNanoseconds() / 1e9)
        self.observed[start.run_id] = obs
        texts = [m.text for m in start.messages]
        steer_in: list[agent_pb2.AgentMessage] = []
        cancelled = asyncio.Event()

        async def read_rest() -> None:
            async for req in request_iterator:
                kind = req.WhichOneof("request")
                if kind == "steer":
                    steer_in.extend(req.steer.messages)
                elif kind == "cancel":
                    obs.cancel_signal = req.cancel.reason
                    if not self.b.ignore_cancel:
                        cancelled.set()

        reader = asyncio.ensure_future(read_rest())

        async def pause(seconds: float) -> bool:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(cancelled.wait(), max(seconds, 0))
            return cancelled.is_set()

        try:
            yield agent_pb2.RunResponse(accepted=agent_pb2.RunAccepted(steerable=self.b.steerable))
            if await pause(self.b.think):
                obs.finished = "cancelled"
                yield agent_pb2.RunResponse(failure=agent_pb2.RunFailure(kind="cancelled", message="stopped"))
                return
            emitted = 0
            chunks = max(self.b.chunks, 1)
            for i in range(chunks):
                if steer_in:
                    taken = list(steer_in)
                    steer_in.clear()
                    accept = self.b.steerable and i < chunks - 1
                    if accept:
                        texts.extend(m.text for m in taken)
                        obs.steered.extend(m.text for m in taken)
                    yield agent_pb2.RunResponse(
                        steer_result=agent_pb2.SteerResult(
                            accepted=accept, message_ids=[m.message_id for m in taken]
                        )
                    )
                text = "agent: " + " | ".join(texts)
                size = -(-(len(text) - emitted) // (chunks - i))
                piece = text[emitted : emitted + size]
                emitted += len(piece)
                yield agent_pb2.RunResponse(chunk=agent_pb2.RunChunk(text=piece))
                if i < chunks - 1 and await pause(self.b.interval):
                    obs.finished = "cancelled"
                    yield agent_pb2.RunResponse(
                        failure=agent_pb2.RunFailure(kind="cancelled", message="stopped")
                    )
                    return
            for m in steer_in:  # arrived after the last boundary: refused, run control falls back to followup
                yield agent_pb2.RunResponse(
                    steer_result=agent_pb2.SteerResult(accepted=False, message_ids=[m.message_id])
                )
            obs.finished = "final"
            yield agent_pb2.RunResponse(final=agent_pb2.RunFinal(text="agent: " + " | ".join(texts)))
        except asyncio.CancelledError:
            obs.call_cancelled = True
            raise
        finally:
            if not obs.finished:
                obs.call_cancelled = True
            reader.cancel()


class ExternalAgentApp(ServiceApp):
    service_names = ("flynn.v1.Agent",)

    def __init__(self, runtime: Runtime, behaviour: AgentBehaviour | None = None) -> None:
        super().__init__(runtime)
        x = runtime.settings.extra
        self.servicer = AgentServicer(
            behaviour
            or AgentBehaviour(
                think=float(x.get("agent_think", 0.0)),  # type: ignore[arg-type]
                chunks=int(x.get("agent_chunks", 3)),  # type: ignore[call-overload]
                interval=float(x.get("agent_interval", 0.05)),  # type: ignore[arg-type]
                steerable=not x.get("agent_no_steer", False),
                ignore_cancel=bool(x.get("agent_ignore_cancel", False)),
            )
        )
        self.started = time.time()

    def register(self, server: grpc.aio.Server) -> None:
        agent_pb2_grpc.add_AgentServicer_to_server(self.servicer, server)


def main() -> None:
    run_service(settings.parse("agent", add_args=add_args), ExternalAgentApp)


if __name__ == "__main__":
    main()
