"""Run control driving the example external agent over flynn.v1.Agent/Run (cancel and deadline propagate)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from flynn.v1 import config_pb2
from flynn.v1 import run_control_pb2 as pb

from examples.external_agent import AgentBehaviour, AgentServicer, ExternalAgentApp
from flynn_runtime.server import running
from tests.support.mesh import ServiceProcess, Tokens, make_settings
from tests.support.queue import QueueHarness, queue_service, wait_for

E = pb.RunEventType


@asynccontextmanager
async def agent_and_queue(
    tmp_path: Path, tokens: Tokens, behaviour: AgentBehaviour, queue_yaml: str = ""
) -> AsyncIterator[tuple[AgentServicer, QueueHarness]]:
    settings = make_settings("agent", tmp_path / "agent", tokens)
    async with running(settings, lambda rt: ExternalAgentApp(rt, behaviour)) as agent_srv:
        app = agent_srv.app
        assert isinstance(app, ExternalAgentApp)
        cfg = f"server: {{agent: {{address: '{agent_srv.address}'}}, queue: {{{queue_yaml}}}}}"
        async with queue_service(tmp_path / "queue", tokens, cfg) as q:
            yield app.servicer, q


async def outputs(q: QueueHarness, run_id: str) -> list[str]:
    return [e.text for e in q.events() if e.run_id == run_id and e.type == E.RUN_EVENT_TYPE_RUN_OUTPUT]


async def test_external_agent_streams_and_completes(tmp_path: Path, tokens: Tokens) -> None:
    async with agent_and_queue(tmp_path, tokens, AgentBehaviour(chunks=3, interval=0.01)) as (agent, q):
        a = await q.submit("s", "hello there")
        run = await q.wait_run(a.run_id)
        assert run.state == pb.RUN_STATE_COMPLETED and run.output == "agent: hello there"
        assert len(await outputs(q, a.run_id)) == 3
        assert agent.observed[a.run_id].finished == "final"
        assert [r.text for r in q.replies()] == ["agent: hello there"]


async def test_external_agent_steer_accepted(tmp_path: Path, tokens: Tokens) -> None:
    async with agent_and_queue(tmp_path, tokens, AgentBehaviour(chunks=6, interval=0.1), "mode: steer") as (
        agent,
        q,
    ):
        a = await q.submit("s", "a")
        await wait_for(lambda: outputs(q, a.run_id), lambda o: len(o) >= 1)
        b = await q.submit("s", "b")
        assert b.disposition == pb.DISPOSITION_STEERED and b.run_id == a.run_id
        run = await q.wait_run(a.run_id)
        assert run.output == "agent: a | b" and list(run.steered_texts) == ["b"]
        assert list(run.message_ids) == [a.message_id, b.message_id]
        kinds = [E.Name(e.type) for e in q.events("s", exclude_output=True)]
        assert kinds == [
            "RUN_EVENT_TYPE_MESSAGE_RECEIVED", "RUN_EVENT_TYPE_RUN_QUEUED", "RUN_EVENT_TYPE_RUN_STARTED",
            "RUN_EVENT_TYPE_MESSAGE_RECEIVED", "RUN_EVENT_TYPE_MESSAGE_STEERED", "RUN_EVENT_TYPE_RUN_COMPLETED",
        ]  # fmt: skip
        assert agent.observed[a.run_id].steered == ["b"]


async def test_steer_falls_back_to_followup_with_a_non_steerable_agent(
    tmp_path: Path, tokens: Tokens
) -> None:
    behaviour = AgentBehaviour(chunks=4, interval=0.1, steerable=False)
    async with agent_and_queue(tmp_path, tokens, behaviour, "mode: steer") as (agent, q):
        a = await q.submit("s", "a")
        await wait_for(lambda: outputs(q, a.run_id), lambda o: len(o) >= 1)
        b = await q.submit("s", "b")
        assert b.disposition == pb.DISPOSITION_QUEUED and b.run_id != a.run_id
        ra, rb = await q.wait_run(a.run_id), await q.wait_run(b.run_id)
        assert ra.output == "agent: a" and rb.output == "agent: b"
        assert rb.mode == config_pb2.QUEUE_MODE_FOLLOWUP
        assert [r.text for r in q.replies()] == ["agent: a", "agent: b"]


async def test_cancel_reaches_the_external_agent(tmp_path: Path, tokens: Tokens) -> None:
    async with agent_and_queue(tmp_path, tokens, AgentBehaviour(chunks=20, interval=0.1)) as (agent, q):
        a = await q.submit("s", "long")
        await wait_for(lambda: outputs(q, a.run_id), lambda o: len(o) >= 1)
        c = await q.cancel(run_id=a.run_id, reason="user said stop")
        assert c.outcome == pb.CANCEL_OUTCOME_CANCEL_REQUESTED
        run = await q.wait_run(a.run_id)
        assert run.state == pb.RUN_STATE_CANCELLED and run.cancel_reason == "user said stop"
        assert agent.observed[a.run_id].cancel_signal == "user said stop"
        assert agent.observed[a.run_id].finished == "cancelled"
        assert q.replies() == []


async def test_forced_cancel_cancels_the_call(tmp_path: Path, tokens: Tokens) -> None:
    behaviour = AgentBehaviour(chunks=100, interval=0.1, ignore_cancel=True)
    async with agent_and_queue(tmp_path, tokens, behaviour, "cancel_deadline: 300ms") as (agent, q):
        a = await q.submit("s", "stubborn")
        await wait_for(lambda: outputs(q, a.run_id), lambda o: len(o) >= 1)
        await q.cancel(run_id=a.run_id, reason="stop")
        run = await q.wait_run(a.run_id)
        assert run.state == pb.RUN_STATE_CANCELLED
        cancelled = [e for e in q.events("s") if e.type == E.RUN_EVENT_TYPE_RUN_CANCELLED]
        assert [e.reason for e in cancelled] == ["forced"]
        await wait_for(lambda _=None: _async(agent.observed[a.run_id].call_cancelled), bool)
        assert agent.observed[a.run_id].cancel_signal == "stop"
        assert q.replies() == []


async def _async(v: bool) -> bool:
    return v


async def test_deadline_propagates_to_the_external_agent(tmp_path: Path, tokens: Tokens) -> None:
    behaviour = AgentBehaviour(think=30.0)
    settings = make_settings("agent", tmp_path / "agent", tokens)
    async with running(settings, lambda rt: ExternalAgentApp(rt, behaviour)) as agent_srv:
        app = agent_srv.app
        assert isinstance(app, ExternalAgentApp)
        cfg = f"server: {{agent: {{address: '{agent_srv.address}', run_timeout: 1s}}}}"
        async with queue_service(tmp_path / "queue", tokens, cfg) as q:
            a = await q.submit("s", "slow")
            run = await q.wait_run(a.run_id)
            assert run.state == pb.RUN_STATE_ERROR and run.error_kind == "timeout"
            obs = app.servicer.observed[a.run_id]
            assert obs.time_remaining is not None and 0 < obs.time_remaining <= 1.1
            assert abs(obs.deadline - (run.start_time.ToNanoseconds() / 1e9 + 1.0)) < 1.0
            await wait_for(lambda: _async(obs.call_cancelled), bool)
            assert q.replies() == []


async def test_example_agent_runs_as_a_process(tmp_path: Path, tokens: Tokens) -> None:
    proc = ServiceProcess(
        "agent", "examples.external_agent", tmp_path / "agent", tokens, extra=["--agent-chunks", "2"]
    )
    proc.start()
    try:
        async with queue_service(
            tmp_path / "queue", tokens, f"server: {{agent: {{address: '{proc.address}'}}}}"
        ) as q:
            a = await q.submit("s", "over the wire")
            run = await q.wait_run(a.run_id)
            assert run.state == pb.RUN_STATE_COMPLETED and run.output == "agent: over the wire"
    finally:
        proc.stop()


async def test_unreachable_agent_ends_the_run_in_error(tmp_path: Path, tokens: Tokens) -> None:
    from tests.support.mesh import free_port

    cfg = f"server: {{agent: {{address: '127.0.0.1:{free_port()}'}}}}"
    async with queue_service(tmp_path, tokens, cfg) as q:
        a = await q.submit("s", "anyone there?")
        run = await q.wait_run(a.run_id)
        assert (
            run.state == pb.RUN_STATE_ERROR
            and run.error_kind == "agent"
            and "UNAVAILABLE" in run.error_message
        )
        # The session is not stuck: the next message runs (here: also into the error, but it runs).
        b = await q.submit("s", "again")
        assert (await q.wait_run(b.run_id)).state == pb.RUN_STATE_ERROR
        assert q.replies() == []
