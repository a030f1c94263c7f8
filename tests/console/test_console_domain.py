"""Unit tests of the console's plain-Python parts: sessions, rollout gates, audit tail."""

from __future__ import annotations

import json
from pathlib import Path

from console import audit_tail, rollout_gates
from console.reply_tally import ReplyTally
from console.sign_in import SessionTable, SignInLimiter, clean_operator_name


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_sessions_expire_when_idle_or_old_and_the_table_is_bounded() -> None:
    clock = Clock()
    table = SessionTable(idle_seconds=10, max_age_seconds=100, max_sessions=3, clock=clock)
    s = table.create("tok", "alice")
    assert table.get(s.session_id) is s and s.actor == "operator:alice"
    assert "tok" not in s.session_id and len(s.session_id) >= 40
    assert s.token_fingerprint != "tok" and len(s.token_fingerprint) == 12
    clock.now += 9
    assert table.get(s.session_id) is s  # used: the idle timer restarts
    clock.now += 11
    assert table.get(s.session_id) is None  # idle too long
    t = table.create("tok", "bob")
    for _ in range(12):
        clock.now += 9
        table.get(t.session_id)
    assert table.get(t.session_id) is None  # older than max age, however busy
    ids = [table.create(f"t{i}", "x").session_id for i in range(5)]
    assert len(table) == 3 and table.get(ids[0]) is None and table.get(ids[-1]) is not None
    assert table.get(None) is None and table.get("nope") is None
    table.drop(ids[-1])
    assert table.get(ids[-1]) is None


def test_operator_names_are_cleaned() -> None:
    assert clean_operator_name("  al ice<script>") == "alicescript"
    assert clean_operator_name("") == "operator"
    assert len(clean_operator_name("x" * 500)) == 64


def test_gate_rows_keep_the_libraries_verdicts_and_name_the_gates() -> None:
    """Verdicts are the shared gates library's; the rows add titles and flag inconclusive windows."""
    from flynn.v1 import system_pb2

    from flynn_runtime.gates import evaluate

    m = system_pb2.GetMetricsResponse()
    m.runs.finals = 5
    m.runs.duplicate_finals_delivered = 1
    m.reactions.matches = 40
    m.reactions.false_positives = 4
    rows = {r["gate"]: r for r in rollout_gates.gate_rows([vars(r) for r in evaluate(None, m)])}
    assert (
        rows["duplicate_finals"]["status"] == "fail"
        and rows["duplicate_finals"]["title"] == "Duplicate finals delivered"
    )
    assert (
        rows["reaction_false_positives"]["status"] == "fail"
        and "10.00%" in rows["reaction_false_positives"]["display"]
    )
    # No cancels and no reconnects: below the minimum sample, never a pass.
    for gate in ("cancel_to_ack_p95", "node_reconnect_success", "error_rate"):
        assert rows[gate]["status"] == "inconclusive" and rows[gate]["inconclusive"], rows[gate]
        assert rows[gate]["sample"] == 0 and rows[gate]["min_sample"] > 0
    assert rows["error_rate"]["title"] == "Error rate"
    assert set(rows) >= {"metrics_available", "tts_no_dropped_replies"}


def test_trend_values_per_gate() -> None:
    m = {
        "runs": {
            "cancel_to_ack": {"count": 3, "p95_ms": 12.5},
            "duplicate_finals_delivered": 0,
            "finals": 10,
            "replies_by_mode": [{"name": "text", "value": 9}],
        },
        "reactions": {"matches": 50, "false_positives": 1},
        "nodes": {"reconnects": [{"name": "success", "value": 99}, {"name": "refused", "value": 1}]},
    }
    assert rollout_gates.trend_values(m) == {
        "cancel_to_ack_p95": 12.5,
        "duplicate_finals": 0.0,
        "reaction_false_positives": 0.02,
        "node_reconnect_success": 0.99,
        "tts_no_dropped_replies": 1.0,
        "error_rate": None,
    }
    # A percentile above the top bucket ("Infinity" in proto JSON) charts at the top bound.
    m["runs"]["cancel_to_ack"] = {"count": 3, "p95_ms": "Infinity", "top_bound_ms": 120000.0}
    m["runs"]["runs_finished"], m["runs"]["runs_errored"] = 20, 1
    slow = rollout_gates.trend_values(m)
    assert slow["cancel_to_ack_p95"] == 120000.0 and slow["error_rate"] == 0.05
    empty = rollout_gates.trend_values({})
    assert empty["cancel_to_ack_p95"] is None and empty["node_reconnect_success"] is None


def test_trend_window_is_bounded_and_compare_flags_changes() -> None:
    w = rollout_gates.TrendWindow(size=5)
    for i in range(8):
        w.add({"cancel_to_ack_p95": float(i), "node_reconnect_success": None}, at=float(i))
    series = w.series()
    assert [v for _, v in series["cancel_to_ack_p95"]] == [3.0, 4.0, 5.0, 6.0, 7.0]
    assert "node_reconnect_success" not in series
    before = [{"gate": "duplicate_finals", "title": "D", "display": "0 delivered", "status": "pass"}]
    after = [{"gate": "duplicate_finals", "title": "D", "display": "2 delivered", "status": "fail"}]
    rows = rollout_gates.compare(before, after)
    assert rows[0]["changed"] and rows[0]["before"] == "0 delivered" and rows[0]["after_status"] == "fail"


def write(path: Path, entries: list[dict[str, object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))


def test_audit_tail_merges_filters_and_bounds(tmp_path: Path) -> None:
    write(
        tmp_path / "config" / "audit" / "config.jsonl",
        [
            {
                "time": "2026-01-01T00:00:01.000Z",
                "service": "config",
                "event": "configUpdate",
                "actor": "operator:a",
            },
            {
                "time": "2026-01-01T00:00:03.000Z",
                "service": "config",
                "event": "configRollback",
                "actor": "operator:b",
            },
        ],
    )
    q = tmp_path / "queue" / "audit" / "queue.jsonl"
    write(
        q,
        [
            {
                "time": "2026-01-01T00:00:02.000Z",
                "service": "queue",
                "event": "runCancelled",
                "actor": "operator:a",
            }
        ],
    )
    with q.open("a") as fh:
        fh.write("not json\n")
    (tmp_path / "console").mkdir()
    dirs = audit_tail.default_audit_dirs(tmp_path / "console")
    assert [d.parent.name for d in dirs] == ["config", "queue"]
    every = audit_tail.tail(dirs, audit_tail.AuditFilter())
    assert [e["event"] for e in every] == ["configUpdate", "runCancelled", "configRollback"]
    assert [e["event"] for e in audit_tail.tail(dirs, audit_tail.AuditFilter(actor="operator:a"))] == [
        "configUpdate",
        "runCancelled",
    ]
    assert [
        e["event"] for e in audit_tail.tail(dirs, audit_tail.AuditFilter(service="config", event="roll"))
    ] == ["configRollback"]
    assert len(audit_tail.tail(dirs, audit_tail.AuditFilter(), limit=1)) == 1
    assert audit_tail.services(dirs) == ["config", "queue"]


def test_audit_tail_reads_only_the_end_of_big_files(tmp_path: Path) -> None:
    f = tmp_path / "a" / "audit" / "big.jsonl"
    write(f, [{"time": f"2026-01-01T00:00:{i % 60:02d}.{i:06d}Z", "event": f"e{i}"} for i in range(20_000)])
    got = audit_tail.tail([f.parent], audit_tail.AuditFilter(), limit=1000, max_bytes=64 * 1024)
    assert 0 < len(got) <= 1000
    assert all(isinstance(e, dict) for e in got)


def test_sign_in_limiter_stays_below_the_gateways_limit() -> None:
    clock = Clock()
    lim = SignInLimiter(per_peer=3, total=5, window_seconds=60, clock=clock)
    for _ in range(3):
        assert lim.retry_after("a") == 0
        lim.record_failure("a")
    assert 0 < lim.retry_after("a") <= 60  # this browser waits
    assert lim.retry_after("b") == 0  # another one may still try
    lim.record_failure("b")
    lim.record_failure("c")
    assert lim.retry_after("d") > 0  # five failures in all: everyone waits
    clock.now += 61
    assert lim.retry_after("a") == 0 and lim.retry_after("d") == 0


def test_reply_tally_counts_finals_by_channel_delivery_engine_and_reasons() -> None:
    t = ReplyTally()
    t.add({"kind": "final", "channel": "v", "delivery": "audio", "engine": "espeak-ng"})
    t.add(
        {
            "kind": "final",
            "channel": "v",
            "delivery": "text_after_fallback",
            "tts_fallback_reason": "voice_unavailable",
        }
    )
    t.add({"kind": "ack", "channel": "v", "delivery": "text"})  # not a final: not counted
    t.add({"kind": "final", "channel": "w", "delivery": "text"})
    snap = t.snapshot()
    assert snap["finals"] == 3 and snap["fallbacks"] == 1
    assert snap["by_mode"] == [
        {"channel": "v", "delivery": "audio", "engine": "espeak-ng", "count": 1},
        {"channel": "v", "delivery": "text_after_fallback", "engine": "—", "count": 1},
        {"channel": "w", "delivery": "text", "engine": "—", "count": 1},
    ]
    assert snap["reasons"] == [{"reason": "voice_unavailable", "count": 1}]
