"""Queue modes through a real in-process RunControl server, with exact expected event sequences."""

from __future__ import annotations

from pathlib import Path

from flynn.v1 import config_pb2
from flynn.v1 import run_control_pb2 as pb

from flynn_runtime.audit import read_audit
from tests.support.mesh import Tokens
from tests.support.queue import QueueHarness, queue_service, wait_for

E = pb.RunEventType


def labelled(
    q: QueueHarness, session: str, names: dict[str, str], with_output: bool = False
) -> list[tuple[str, str]]:
    """Event sequence as (TYPE, label of the run or message), labels from `names` (id -> label)."""
    out = []
    for e in q.events(session, exclude_output=not with_output):
        kind = E.Name(e.type).removeprefix("RUN_EVENT_TYPE_")
        if e.type in (
            E.RUN_EVENT_TYPE_MESSAGE_RECEIVED,
            E.RUN_EVENT_TYPE_MESSAGE_DROPPED,
            E.RUN_EVENT_TYPE_MESSAGE_STEERED,
        ):
            out.append((kind, names.get(e.message_id, e.message_id)))
        else:
            out.append((kind, names.get(e.run_id, e.run_id)))
    return out


def assert_gapless(q: QueueHarness, session: str) -> None:
    evs = q.events(session)
    assert [e.session_seq for e in evs] == list(range(1, len(evs) + 1))
    allev = q.events()
    assert [e.global_seq for e in allev] == list(range(1, len(allev) + 1))


async def first_output(q: QueueHarness, run_id: str) -> None:
    async def outputs() -> list[pb.RunEvent]:
        return [e for e in q.events() if e.run_id == run_id and e.type == E.RUN_EVENT_TYPE_RUN_OUTPUT]

    await wait_for(outputs, lambda evs: len(evs) >= 1)


SLOW = "agent: {think_time: 300ms, chunks: 1}"
STREAM = "agent: {think_time: 0s, chunks: 5, chunk_interval: 100ms}"


async def test_followup_runs_each_message_in_order(tmp_path: Path, tokens: Tokens) -> None:
    async with queue_service(tmp_path, tokens, f"server: {{queue: {{mode: followup}}, {SLOW}}}") as q:
        a = await q.submit("s", "one")
        b = await q.submit("s", "two")
        c = await q.submit("s", "three")
        assert [a.disposition, b.disposition, c.disposition] == [
            pb.DISPOSITION_STARTED, pb.DISPOSITION_QUEUED, pb.DISPOSITION_QUEUED,
        ]  # fmt: skip
        assert a.effective_mode.mode == config_pb2.QUEUE_MODE_FOLLOWUP
        assert a.effective_mode.source == config_pb2.VALUE_SOURCE_GLOBAL
        runs = [await q.wait_run(x.run_id) for x in (a, b, c)]
        assert [r.output for r in runs] == ["echo: one", "echo: two", "echo: three"]
        await q.wait_idle("s")
        n = {
            a.message_id: "m1",
            b.message_id: "m2",
            c.message_id: "m3",
            a.run_id: "r1",
            b.run_id: "r2",
            c.run_id: "r3",
        }
        assert labelled(q, "s", n) == [
            ("MESSAGE_RECEIVED", "m1"), ("RUN_QUEUED", "r1"), ("RUN_STARTED", "r1"),
            ("MESSAGE_RECEIVED", "m2"), ("RUN_QUEUED", "r2"),
            ("MESSAGE_RECEIVED", "m3"), ("RUN_QUEUED", "r3"),
            ("RUN_COMPLETED", "r1"), ("RUN_STARTED", "r2"),
            ("RUN_COMPLETED", "r2"), ("RUN_STARTED", "r3"),
            ("RUN_COMPLETED", "r3"),
        ]  # fmt: skip
        assert [r.run_id for r in q.replies()] == [a.run_id, b.run_id, c.run_id]
        assert_gapless(q, "s")
        # Every run-state transition is in the audit log, with from/to, reason and actor.
        audit = [x for x in read_audit(tmp_path / "audit" / "queue.jsonl") if x["event"] == "runState"]
        trail = [(x["run_id"], x["from"], x["to"]) for x in audit if x["run_id"] == b.run_id]
        assert trail == [
            (b.run_id, "none", "queued"),
            (b.run_id, "queued", "started"),
            (b.run_id, "started", "completed"),
        ]
        assert all(x["session"] == "s" and x["actor"] for x in audit)


async def test_collect_merges_five_messages_in_arrival_order(tmp_path: Path, tokens: Tokens) -> None:
    async with queue_service(tmp_path, tokens, f"server: {{queue: {{mode: collect}}, {SLOW}}}") as q:
        first = await q.submit("s", "first")
        later = [await q.submit("s", f"t{i}") for i in range(1, 6)]
        assert first.disposition == pb.DISPOSITION_STARTED
        assert all(x.disposition == pb.DISPOSITION_COLLECTED and x.run_id == "" for x in later)
        await q.wait_run(first.run_id)
        await q.wait_idle("s")
        runs = (await q.stub.ListRuns(pb.ListRunsRequest(session_key="s"), metadata=q.md)).runs
        assert len(runs) == 2
        merged = runs[0]  # newest first
        assert merged.state == pb.RUN_STATE_COMPLETED
        assert list(merged.message_ids) == [x.message_id for x in later]
        assert merged.output == "echo: t1 | t2 | t3 | t4 | t5"
        assert merged.mode == config_pb2.QUEUE_MODE_COLLECT
        n = {first.run_id: "r1", merged.run_id: "r2", first.message_id: "m0"}
        n.update({x.message_id: f"m{i}" for i, x in enumerate(later, 1)})
        assert labelled(q, "s", n) == [
            ("MESSAGE_RECEIVED", "m0"), ("RUN_QUEUED", "r1"), ("RUN_STARTED", "r1"),
            *[("MESSAGE_RECEIVED", f"m{i}") for i in range(1, 6)],
            ("RUN_COMPLETED", "r1"), ("RUN_QUEUED", "r2"), ("RUN_STARTED", "r2"), ("RUN_COMPLETED", "r2"),
        ]  # fmt: skip
        # The same key returns the original outcome, now pointing at the run that carried it.
        dup = await q.submit("s", "t3", key="s/t3")
        assert dup.disposition == pb.DISPOSITION_DUPLICATE
        assert dup.original_disposition == pb.DISPOSITION_COLLECTED
        assert dup.message_id == later[2].message_id and dup.run_id == merged.run_id
        assert [r.text for r in q.replies()] == ["echo: first", "echo: t1 | t2 | t3 | t4 | t5"]


async def test_collect_quiet_window_takes_late_messages(tmp_path: Path, tokens: Tokens) -> None:
    cfg = "server: {queue: {mode: collect, quiet_window: 1s}, agent: {think_time: 100ms}}"
    async with queue_service(tmp_path, tokens, cfg) as q:
        a = await q.submit("s", "a")
        await q.submit("s", "b")
        await q.wait_run(a.run_id)
        c = await q.submit("s", "c")  # the run ended, but the buffer waits for quiet
        assert c.disposition == pb.DISPOSITION_COLLECTED
        await q.wait_idle("s")
        runs = (await q.stub.ListRuns(pb.ListRunsRequest(session_key="s"), metadata=q.md)).runs
        assert [r.output for r in runs] == ["echo: b | c", "echo: a"]


async def test_interrupt_while_streaming(tmp_path: Path, tokens: Tokens) -> None:
    async with queue_service(tmp_path, tokens, f"server: {{queue: {{mode: interrupt}}, {STREAM}}}") as q:
        stream = q.stub.StreamReplies(pb.StreamRepliesRequest(), metadata=q.md)
        a = await q.submit("s", "old question")
        await first_output(q, a.run_id)
        b = await q.submit("s", "new question")
        assert b.disposition == pb.DISPOSITION_INTERRUPTED_PREVIOUS
        assert b.interrupted_run_id == a.run_id and b.run_id != a.run_id
        old = await q.wait_run(a.run_id)
        new = await q.wait_run(b.run_id)
        assert old.state == pb.RUN_STATE_CANCELLED and old.cancel_reason == "interrupt"
        assert (
            old.output and "echo: old question".startswith(old.output) and old.output != "echo: old question"
        )
        assert old.final_reply_id == ""
        assert new.state == pb.RUN_STATE_COMPLETED and new.output == "echo: new question"
        n = {a.run_id: "r1", b.run_id: "r2", a.message_id: "m1", b.message_id: "m2"}
        assert labelled(q, "s", n) == [
            ("MESSAGE_RECEIVED", "m1"), ("RUN_QUEUED", "r1"), ("RUN_STARTED", "r1"),
            ("MESSAGE_RECEIVED", "m2"), ("RUN_CANCEL_REQUESTED", "r1"), ("RUN_QUEUED", "r2"),
            ("RUN_CANCELLED", "r1"), ("RUN_STARTED", "r2"), ("RUN_COMPLETED", "r2"),
        ]  # fmt: skip
        # Exactly one final, for the new run; the old reply is never sent, also not on a replay.
        first = await stream.read()
        assert first.reply.run_id == b.run_id and first.reply.kind == pb.REPLY_KIND_FINAL
        stream.cancel()
        replies = q.replies()
        assert [(r.run_id, r.kind) for r in replies] == [(b.run_id, pb.REPLY_KIND_FINAL)]
        outputs = [
            e.text
            for e in q.events("s", exclude_output=False)
            if e.type == E.RUN_EVENT_TYPE_RUN_OUTPUT and e.run_id == a.run_id
        ]
        assert "".join(outputs) == old.output
        assert_gapless(q, "s")


async def test_interrupt_twice_supersedes_waiting_interrupter(tmp_path: Path, tokens: Tokens) -> None:
    # The old run ignores nothing, but a long chunk interval keeps it busy while two interrupts arrive.
    async with queue_service(tmp_path, tokens, f"server: {{queue: {{mode: interrupt}}, {STREAM}}}") as q:
        a = await q.submit("s", "a")
        await first_output(q, a.run_id)
        b = await q.submit("s", "b")
        c = await q.submit("s", "c")
        runs = [await q.wait_run(x.run_id) for x in (a, b, c)]
        assert runs[0].state == pb.RUN_STATE_CANCELLED
        assert runs[2].state == pb.RUN_STATE_COMPLETED and runs[2].output == "echo: c"
        # b either started and was interrupted by c, or was superseded before it started: never both final.
        assert runs[1].state == pb.RUN_STATE_CANCELLED
        assert [r.run_id for r in q.replies()] == [c.run_id]


async def test_steer_is_taken_at_the_next_boundary(tmp_path: Path, tokens: Tokens) -> None:
    async with queue_service(tmp_path, tokens, f"server: {{queue: {{mode: steer}}, {STREAM}}}") as q:
        a = await q.submit("s", "go")
        await first_output(q, a.run_id)
        b = await q.submit("s", "and left")
        assert b.disposition == pb.DISPOSITION_STEERED and b.run_id == a.run_id
        run = await q.wait_run(a.run_id)
        assert run.state == pb.RUN_STATE_COMPLETED
        assert run.output == "echo: go | and left"
        assert list(run.steered_texts) == ["and left"]
        assert list(run.message_ids) == [a.message_id, b.message_id]
        n = {a.run_id: "r1", a.message_id: "m1", b.message_id: "m2"}
        assert labelled(q, "s", n) == [
            ("MESSAGE_RECEIVED", "m1"), ("RUN_QUEUED", "r1"), ("RUN_STARTED", "r1"),
            ("MESSAGE_RECEIVED", "m2"), ("MESSAGE_STEERED", "m2"), ("RUN_COMPLETED", "r1"),
        ]  # fmt: skip
        # Streamed output is a prefix-consistent stream of the final text.
        outs = [e.text for e in q.events("s", exclude_output=False) if e.type == E.RUN_EVENT_TYPE_RUN_OUTPUT]
        assert "".join(outs) == run.output
        assert [r.text for r in q.replies()] == ["echo: go | and left"]


async def test_steer_falls_back_to_followup_when_the_run_cannot_take_it(
    tmp_path: Path, tokens: Tokens
) -> None:
    cfg = "server: {queue: {mode: steer, cancel_deadline: 5s}, agent: {think_time: 0s, chunks: 5, chunk_interval: 100ms}}"
    async with queue_service(tmp_path, tokens, cfg) as q:
        a = await q.submit("s", "go")
        await first_output(q, a.run_id)
        c = await q.cancel(run_id=a.run_id, reason="stop")
        assert c.outcome == pb.CANCEL_OUTCOME_CANCEL_REQUESTED
        # A run being cancelled cannot be steered: the message becomes its own run.
        b = await q.submit("s", "then this")
        assert b.disposition in (pb.DISPOSITION_QUEUED, pb.DISPOSITION_STARTED) and b.run_id != a.run_id
        run = await q.wait_run(b.run_id)
        assert run.output == "echo: then this"
        if b.disposition == pb.DISPOSITION_QUEUED:  # the cancelled run had not settled yet
            assert run.mode == config_pb2.QUEUE_MODE_FOLLOWUP


async def test_config_change_applies_to_the_next_message(tmp_path: Path, tokens: Tokens) -> None:
    async with queue_service(tmp_path, tokens, f"server: {{queue: {{mode: followup}}, {STREAM}}}") as q:
        a = await q.submit("s", "a")
        b = await q.submit("s", "b")
        assert b.disposition == pb.DISPOSITION_QUEUED
        await q.set_config(
            f"server: {{queue: {{mode: followup, overrides: {{sessions: {{s: interrupt}}}}}}, {STREAM}}}"
        )
        c = await q.submit("s", "c")
        assert c.disposition == pb.DISPOSITION_INTERRUPTED_PREVIOUS and c.interrupted_run_id == a.run_id
        assert c.effective_mode.source == config_pb2.VALUE_SOURCE_SESSION_OVERRIDE
        assert c.effective_mode.config_revision == 2
        other = await q.submit("t", "x")
        assert other.effective_mode.mode == config_pb2.QUEUE_MODE_FOLLOWUP
        # A per-message override wins over everything.
        d = await q.submit("s", "d", mode_override=config_pb2.QUEUE_MODE_FOLLOWUP)
        assert d.disposition == pb.DISPOSITION_QUEUED
        assert d.effective_mode.source == config_pb2.VALUE_SOURCE_MESSAGE_OVERRIDE
        # The interrupter runs right after the cancelled run settles, ahead of b and d.
        ra, rc = await q.wait_run(a.run_id), await q.wait_run(c.run_id)
        rb, rd = await q.wait_run(b.run_id), await q.wait_run(d.run_id)
        assert ra.state == pb.RUN_STATE_CANCELLED
        assert rc.start_time.ToNanoseconds() < rb.start_time.ToNanoseconds() < rd.start_time.ToNanoseconds()
        assert [r.run_id for r in q.replies() if r.session_key == "s"] == [c.run_id, b.run_id, d.run_id]


async def test_bounded_queue_drop_new(tmp_path: Path, tokens: Tokens) -> None:
    cfg = f"server: {{queue: {{mode: followup, cap: 2, drop: new}}, {SLOW}}}"
    async with queue_service(tmp_path, tokens, cfg) as q:
        await q.submit("s", "a")
        b, c, d = [await q.submit("s", t) for t in "bcd"]
        assert [x.disposition for x in (b, c, d)] == [
            pb.DISPOSITION_QUEUED,
            pb.DISPOSITION_QUEUED,
            pb.DISPOSITION_DROPPED,
        ]
        assert d.run_id == ""
        drops = [e for e in q.events("s") if e.type == E.RUN_EVENT_TYPE_MESSAGE_DROPPED]
        assert [(e.message_id, e.reason) for e in drops] == [(d.message_id, "queue_full_new")]
        await q.wait_idle("s")
        assert [r.text for r in q.replies()] == ["echo: a", "echo: b", "echo: c"]
        dup = await q.submit("s", "d")
        assert dup.original_disposition == pb.DISPOSITION_DROPPED


async def test_bounded_queue_drop_old(tmp_path: Path, tokens: Tokens) -> None:
    cfg = f"server: {{queue: {{mode: followup, cap: 2, drop: old}}, {SLOW}}}"
    async with queue_service(tmp_path, tokens, cfg) as q:
        a = await q.submit("s", "a")
        b, c, d = [await q.submit("s", t) for t in "bcd"]
        assert d.disposition == pb.DISPOSITION_QUEUED
        rb = await q.wait_run(b.run_id)
        assert rb.state == pb.RUN_STATE_CANCELLED and rb.cancel_reason == "queue_full_old"
        drops = [e for e in q.events("s") if e.type == E.RUN_EVENT_TYPE_MESSAGE_DROPPED]
        assert [(e.message_id, e.reason) for e in drops] == [(b.message_id, "queue_full_old")]
        await q.wait_idle("s")
        assert [r.text for r in q.replies()] == ["echo: a", "echo: c", "echo: d"]
        assert a.run_id


async def test_runs_carry_the_causation_of_their_messages(tmp_path: Path, tokens: Tokens) -> None:
    from flynn.v1 import common_pb2

    async with queue_service(tmp_path, tokens, f"server: {{queue: {{mode: collect}}, {SLOW}}}") as q:
        a = await q.submit("s", "user says hi")
        cz = common_pb2.Causation(
            origin=common_pb2.ORIGIN_REACTION, chain_id="evt_1", depth=1, fired_rule_ids=["r"]
        )
        q.md = tokens.md("service")  # only the reactions service (or a test's "*" service) sets causation
        await q.submit("s", "reaction one", causation=cz)
        await q.submit("s", "reaction two", causation=cz)
        await q.wait_run(a.run_id)
        await q.wait_idle("s")
        merged = [e for e in q.events("s") if e.type == E.RUN_EVENT_TYPE_RUN_COMPLETED][-1]
        assert merged.run_id != a.run_id and merged.causation == cz
        first = [e for e in q.events("s") if e.type == E.RUN_EVENT_TYPE_RUN_COMPLETED][0]
        assert first.causation.origin in (common_pb2.ORIGIN_UNSPECIFIED, common_pb2.ORIGIN_USER)
