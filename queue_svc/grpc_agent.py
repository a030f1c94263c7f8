"""An external agent over flynn.v1.Agent/Run (bidi stream), behind the same Agent interface.

Deadline: the run's remaining time is the gRPC timeout (and RunStart.deadline). Cancellation: a
CancelSignal first (the agent answers RunFailure{kind: "cancelled"}); a forced cancel cancels the call,
which grpc propagates to the agent's handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc
from flynn.v1 import agent_pb2, agent_pb2_grpc

from flynn_runtime.channels import client_channel
from flynn_runtime.timestamps import timestamp
from queue_svc.agents import AgentHooks, AgentInput, AgentRun, Cancelled, Failure, Final, Outcome, RunSpec

log = logging.getLogger(__name__)


def _msgs(inputs: list[AgentInput] | tuple[AgentInput, ...]) -> list[agent_pb2.AgentMessage]:
    return [agent_pb2.AgentMessage(message_id=i.message_id, sender=i.sender, text=i.text) for i in inputs]


class _GrpcRun:
    def __init__(self, stub: agent_pb2_grpc.AgentAsyncStub, spec: RunSpec, hooks: AgentHooks) -> None:
        self._spec = spec
        self._hooks = hooks
        self.steerable: bool | None = None
        self._cancel_sent = False
        self._call = stub.Run(timeout=max(spec.deadline - time.time(), 0.001))  # type: ignore[call-arg]
        self._writes: asyncio.Queue[agent_pb2.RunRequest | None] = asyncio.Queue()
        self._task = asyncio.ensure_future(self._main())

    def offer_steer(self, inputs: list[AgentInput]) -> bool | None:
        if self.steerable is not True or self._cancel_sent or self._task.done():
            return False
        self._writes.put_nowait(agent_pb2.RunRequest(steer=agent_pb2.SteerInput(messages=_msgs(inputs))))
        return None

    def cancel(self, reason: str) -> None:
        if not self._cancel_sent:
            self._cancel_sent = True
            self._writes.put_nowait(agent_pb2.RunRequest(cancel=agent_pb2.CancelSignal(reason=reason)))

    async def result(self) -> Outcome:
        try:
            return await asyncio.shield(self._task)
        except asyncio.CancelledError:
            self._call.cancel()
            self._task.cancel()
            raise

    async def _writer(self) -> None:
        deadline = timestamp(self._spec.deadline)
        start = agent_pb2.RunStart(
            run_id=self._spec.run_id,
            session_key=self._spec.session_key,
            channel=self._spec.channel,
            messages=_msgs(self._spec.inputs),
            deadline=deadline,
            attempt=self._spec.attempt,
        )
        await self._call.write(agent_pb2.RunRequest(start=start))
        while True:
            req = await self._writes.get()
            if req is None:
                return
            await self._call.write(req)

    async def _main(self) -> Outcome:
        writer = asyncio.ensure_future(self._writer())
        try:
            while True:
                got = await self._call.read()
                if not isinstance(got, agent_pb2.RunResponse):  # grpc.aio.EOF
                    return Failure("agent", "the agent ended the stream without a final")
                resp = got
                kind = resp.WhichOneof("response")
                if kind == "accepted":
                    self.steerable = resp.accepted.steerable
                elif kind == "chunk":
                    self._hooks.on_chunk(resp.chunk.text)
                elif kind == "steer_result":
                    self._hooks.on_steer_result(
                        resp.steer_result.accepted, list(resp.steer_result.message_ids)
                    )
                elif kind == "final":
                    self.steerable = False
                    return Final(resp.final.text)
                elif kind == "failure":
                    self.steerable = False
                    if resp.failure.kind == "cancelled" and self._cancel_sent:
                        return Cancelled()
                    return Failure(resp.failure.kind or "agent", resp.failure.message)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return Failure("timeout", "the agent did not finish before the run deadline")
            if e.code() == grpc.StatusCode.CANCELLED and self._cancel_sent:
                return Cancelled()
            return Failure("agent", f"{e.code().name}: {e.details()}")
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError, Exception):
                await writer
            with contextlib.suppress(Exception):
                await self._call.done_writing()


class GrpcAgent:
    def __init__(self, address: str, token: str = "") -> None:
        self.address = address
        self._channel = client_channel(address, token, retries=False)
        self._stub: agent_pb2_grpc.AgentAsyncStub = agent_pb2_grpc.AgentStub(self._channel)

    def open(self, spec: RunSpec, hooks: AgentHooks) -> AgentRun:
        return _GrpcRun(self._stub, spec, hooks)

    async def close(self) -> None:
        await self._channel.close(None)
