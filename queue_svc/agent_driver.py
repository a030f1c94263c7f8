"""Driving the agent of each started run: open the call, stream its output and steer results into
run control, tell it about a cancel, force a cancel past server.queue.cancel_deadline, and hand its
outcome back to run control (`RunControl._finish`), which alone decides how the run ends.

Everything here is called after a commit (from `op.after`) or from the agent's callbacks, never inside
an operation; each callback that changes state opens its own operation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from flynn.v1 import config_pb2
from flynn.v1 import run_control_pb2 as pb

from flynn_runtime.timestamps import duration_seconds
from queue_svc.agents import Agent, AgentHooks, AgentInput, Cancelled, Failure, Outcome, RunSpec
from queue_svc.ledger import ACTIVE, CANCEL_REQUESTED, _Live

if TYPE_CHECKING:
    from queue_svc.run_control import RunControl

log = logging.getLogger(__name__)


class AgentProvider:
    """Which agent runs a run, chosen per run from the live config (server.agent.address)."""

    def __init__(self, builtin: Agent, external: Callable[[str], Agent] | None = None) -> None:
        self._builtin = builtin
        self._external = external
        self._by_address: dict[str, Agent] = {}

    def for_config(self, cfg: config_pb2.FlynnConfig) -> Agent:
        address = cfg.server.agent.address
        if not address or self._external is None:
            return self._builtin
        if address not in self._by_address:
            self._by_address[address] = self._external(address)
        return self._by_address[address]

    async def close(self) -> None:
        await self._builtin.close()
        for a in self._by_address.values():
            await a.close()


class AgentDriver:
    """The agent side of every run of one RunControl."""

    def __init__(self, rc: RunControl, agents: AgentProvider) -> None:
        self.rc = rc
        self.agents = agents

    def stop(self, runs: list[_Live]) -> list[asyncio.Task[None]]:
        """Cancel the drivers of these runs (they stay active in the store); returns what to wait for."""
        tasks: list[asyncio.Task[None]] = []
        for live in runs:
            if live.force is not None:
                live.force.cancel()
            if live.driver is not None and not live.driver.done():
                live.driver.cancel()
                tasks.append(live.driver)
        return tasks

    def launch(self, live: _Live) -> None:
        if self.rc._stopping or live.row.state not in ACTIVE:
            return
        cfg = self.rc.config.config
        a = cfg.server.agent
        spec = RunSpec(
            run_id=live.row.run_id,
            session_key=live.row.session_key,
            channel=live.row.channel,
            inputs=tuple(AgentInput(i.message_id, i.sender, i.text) for i in live.row.inputs),
            attempt=live.row.attempt,
            deadline=time.time() + duration_seconds(a.run_timeout, 120.0),
        )
        hooks = AgentHooks(
            on_chunk=lambda text: self._on_chunk(live, text),
            on_steer_result=lambda ok, ids: self._on_steer_result(live, ok, ids),
        )
        trace = self.rc._trace
        try:
            # With tracing on, the agent call (and the driver's awaits) run inside the run's span.
            traced = trace.running(live.row.run_id, live.row.causation) if trace is not None else None
            with traced or contextlib.nullcontext():
                live.agent_run = self.agents.for_config(cfg).open(spec, hooks)
                live.driver = asyncio.ensure_future(self._drive(live, spec.deadline))
        except Exception as e:
            log.exception("agent failed to open a run", extra={"run_id": live.row.run_id})
            failure = Failure("agent", f"cannot open the run: {e}")
            self.rc._finish(live, failure)  # runs after a commit (op.after), never inside an operation
            return
        if live.row.state == CANCEL_REQUESTED:
            self.signal_cancel(live)

    async def _drive(self, live: _Live, deadline: float) -> None:
        assert live.agent_run is not None
        try:
            outcome: Outcome = await asyncio.wait_for(
                live.agent_run.result(), max(deadline - time.time(), 0.001)
            )
        except TimeoutError:
            outcome = Failure("timeout", "the run exceeded server.agent.run_timeout")
        except asyncio.CancelledError:
            if self.rc._stopping or not live.forced:
                raise
            outcome = Cancelled(forced=True)
        except Exception as e:
            log.warning("agent failed", extra={"run_id": live.row.run_id, "error": repr(e)})
            outcome = Failure("agent", str(e) or repr(e))
        if not self.rc._stopping:
            self.rc._finish(live, outcome)

    def _on_chunk(self, live: _Live, text: str) -> None:
        if live.row.state not in ACTIVE or not text or self.rc._runs.get(live.row.run_id) is not live:
            return
        s = self.rc._sessions[live.row.session_key]
        with self.rc._op(lazy=True) as op:  # nobody waits for a chunk: its batch may linger
            # The row's output column is written at the next state transition; until then the chunks
            # are durable as RUN_OUTPUT events (rewriting the growing row per chunk costs too much).
            live.row.output += text
            self.rc._event(op, s, pb.RUN_EVENT_TYPE_RUN_OUTPUT, run=live.row, state=live.row.state, text=text)

    def _on_steer_result(self, live: _Live, accepted: bool, ids: list[str]) -> None:
        taken = [live.pending_steer.pop(i) for i in ids if i in live.pending_steer]
        if not taken or self.rc._runs.get(live.row.run_id) is not live:
            return
        s = self.rc._sessions[live.row.session_key]
        with self.rc._op() as op:
            for inp in taken:
                if accepted and live.row.state in ACTIVE:
                    self.rc._steered(op, s, live, inp)
                else:
                    self.rc._steer_fallback(op, s, inp)

    def signal_cancel(self, live: _Live) -> None:
        if live.agent_run is not None:
            try:
                live.agent_run.cancel(live.row.cancel_reason)
            except Exception:
                log.exception("agent cancel failed", extra={"run_id": live.row.run_id})
        if live.force is None and live.driver is not None:
            loop = asyncio.get_running_loop()
            live.force = loop.call_later(self.rc._cancel_deadline(), self._force_cancel, live)

    def _force_cancel(self, live: _Live) -> None:
        if live.row.state != CANCEL_REQUESTED or live.driver is None or live.driver.done():
            return
        log.warning("forcing cancel after server.queue.cancel_deadline", extra={"run_id": live.row.run_id})
        live.forced = True
        live.driver.cancel()
