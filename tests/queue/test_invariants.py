"""200 concurrent sessions x seeded random mixes of submit / cancel / mode flips: the invariants hold.

Every run has exactly one terminal event, at most one final (and one exactly when completed, none
when cancelled), and every acknowledged message is accounted for: in a run's inputs, or dropped
with a reason. Sequence numbers are gapless globally and per session.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter, defaultdict
from pathlib import Path

from flynn.v1 import config_pb2
from flynn.v1 import run_control_pb2 as pb

from queue_svc import metrics
from tests.support.mesh import Tokens
from tests.support.queue import TERMINAL_EVENTS, QueueHarness, queue_service, wait_for

SESSIONS = 200
OPS = 6
MODES = ["collect", "followup", "interrupt", "steer"]


def cfg(mode: str, drop: str) -> str:
    return (
        f"server: {{queue: {{mode: {mode}, cap: 3, drop: {drop}, cancel_deadline: 500ms}}, "
        "agent: {think_time: 30ms, chunks: 3, chunk_interval: 15ms}}"
    )


def check_invariants(q: QueueHarness, acked: dict[str, str]) -> None:
    events = q.events()
    assert [e.global_seq for e in events] == list(range(1, len(events) + 1))
    per_session: dict[str, list[int]] = defaultdict(list)
    for e in events:
        per_session[e.session_key].append(e.session_seq)
    for key, seqs in per_session.items():
        assert seqs == list(range(1, len(seqs) + 1)), key
    terminals = Counter(e.run_id for e in events if e.type in TERMINAL_EVENTS)
    runs = q.runs()
    assert runs, "no runs"
    for r in runs:
        assert terminals[r.run_id] == 1, (r.run_id, r.state, terminals[r.run_id])
    assert set(terminals) == {r.run_id for r in runs}
    finals = Counter(x.run_id for x in q.replies() if x.kind == pb.REPLY_KIND_FINAL)
    assert all(n == 1 for n in finals.values()), "a run has two finals"
    for r in runs:
        assert finals[r.run_id] == (1 if r.state == pb.RUN_STATE_COMPLETED else 0), (r.run_id, r.state)
    in_runs = {i.message_id for r in runs for i in r.inputs}
    dropped = {e.message_id: e.reason for e in events if e.type == pb.RUN_EVENT_TYPE_MESSAGE_DROPPED}
    assert all(dropped.values()), "a drop without a reason"
    missing = [m for m in acked if m not in in_runs and m not in dropped]
    assert not missing, f"{len(missing)} acknowledged messages unaccounted for"


async def test_random_mix_keeps_every_invariant(tmp_path: Path, tokens: Tokens) -> None:
    rng = random.Random(20261127)
    dup_before = metrics.DUPLICATE_FINALS_SUPPRESSED._value.get()
    async with queue_service(tmp_path, tokens, cfg("collect", "old")) as q:
        acked: dict[str, str] = {}  # message id -> session
        sent: list[tuple[str, str, str]] = []  # (session, key, message id) for duplicate checks
        plans = {f"sess-{i}": [rng.random() for _ in range(OPS)] for i in range(SESSIONS)}
        seeds = {k: rng.randrange(1 << 30) for k in plans}

        async def session(key: str) -> None:
            r = random.Random(seeds[key])
            run_ids: list[str] = []
            for n, roll in enumerate(plans[key]):
                if roll < 0.6:
                    # A burst of messages at once, so queues fill, merge, steer, interrupt and drop.
                    burst = [
                        (f"{key}/{n}/{j}", r.choice([0, 0, 0, *range(1, 5)])) for j in range(r.randint(1, 5))
                    ]
                    resps = await asyncio.gather(
                        *(q.submit(key, f"{key} msg {k}", key=k, mode_override=o) for k, o in burst)
                    )
                    for (k, _), resp in zip(burst, resps, strict=True):
                        assert resp.disposition != pb.DISPOSITION_DUPLICATE
                        acked[resp.message_id] = key
                        sent.append((key, k, resp.message_id))
                        if resp.run_id:
                            run_ids.append(resp.run_id)
                elif roll < 0.8 and run_ids:
                    await q.cancel(run_id=r.choice(run_ids), reason="random")
                elif roll < 0.9:
                    scope = r.choice([pb.CANCEL_SCOPE_SESSION, pb.CANCEL_SCOPE_SESSION_AND_QUEUE])
                    try:
                        await q.cancel(session_key=key, scope=scope, reason="random-session")
                    except Exception as e:  # a session that has no message yet is NOT_FOUND
                        assert "NOT_FOUND" in str(e) or "not found" in str(e)
                elif sent:
                    s, k, mid = r.choice(sent)
                    dup = await q.submit(s, "again", key=k)
                    assert dup.disposition == pb.DISPOSITION_DUPLICATE and dup.message_id == mid
                await asyncio.sleep(r.random() * 0.008)

        async def flipper() -> None:
            for _ in range(10):
                await asyncio.sleep(0.05)
                await q.set_config(cfg(rng.choice(MODES), rng.choice(["old", "new"])))

        await asyncio.gather(flipper(), *(session(k) for k in plans))

        def all_idle() -> bool:
            return all(not s.active and not s.queue for s in q.rc._sessions.values())

        await wait_for(lambda: asyncio.sleep(0, all_idle()), bool, within=60)
        await q.rc.durable()
        assert len(acked) > SESSIONS
        check_invariants(q, acked)
        # The mix really exercised every path.
        kinds = Counter(e.type for e in q.events())
        assert kinds[pb.RUN_EVENT_TYPE_MESSAGE_DROPPED] and kinds[pb.RUN_EVENT_TYPE_RUN_CANCELLED]
        assert kinds[pb.RUN_EVENT_TYPE_MESSAGE_STEERED] and kinds[pb.RUN_EVENT_TYPE_RUN_COMPLETED]
        assert any(len(r.inputs) > 1 for r in q.runs())
        assert metrics.DUPLICATE_FINALS_SUPPRESSED._value.get() == dup_before
        # Everything the stream replays agrees with the store.
        modes = Counter(r.mode for r in q.runs())
        assert set(modes) <= {config_pb2.QUEUE_MODE_COLLECT, config_pb2.QUEUE_MODE_FOLLOWUP,
                              config_pb2.QUEUE_MODE_INTERRUPT, config_pb2.QUEUE_MODE_STEER}  # fmt: skip
