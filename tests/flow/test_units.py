"""Unit tests of the flow's plain-Python parts: metrics page parsing and percentiles, the gates
evaluation over windows (restarts included), the probe checksum, voice-note artifact names, the
rollback steps' field masks."""

from __future__ import annotations

import math

import pytest
from flynn.v1 import system_pb2

from flynn_cli import gates_cmds, playbook_cmds
from flynn_runtime import config_yaml, gates
from flynn_runtime.gates import GateResult, Limits
from flynn_runtime.histograms import CANCEL_BUCKETS, CANCEL_DEADLINE_MAX_S, format_ms
from gateway import inbound_voice, mesh_metrics

PAGE = """
# HELP flynn_runs_total Run-state transitions
# TYPE flynn_runs_total counter
flynn_runs_total{state="completed"} 10.0
flynn_runs_total{state="cancelled"} 2.0
# TYPE flynn_cancel_to_ack_seconds histogram
flynn_cancel_to_ack_seconds_bucket{le="0.001"} 1.0
flynn_cancel_to_ack_seconds_bucket{le="0.01"} 9.0
flynn_cancel_to_ack_seconds_bucket{le="0.1"} 10.0
flynn_cancel_to_ack_seconds_bucket{le="+Inf"} 10.0
flynn_cancel_to_ack_seconds_count 10.0
flynn_cancel_to_ack_seconds_sum 0.05
# TYPE flynn_replies_delivered_total counter
flynn_replies_delivered_total{mode="text"} 7.0
flynn_replies_delivered_total{mode="text_after_fallback"} 3.0
# TYPE flynn_tts_fallbacks_total counter
flynn_tts_fallbacks_total{reason="timeout"} 3.0
# TYPE flynn_duplicate_finals_suppressed_total counter
flynn_duplicate_finals_suppressed_total 1.0
"""


def test_parse_and_build_run_figures() -> None:
    resp = mesh_metrics.build({"queue": mesh_metrics.parse(PAGE)})
    assert {n.name: n.value for n in resp.runs.run_states} == {"cancelled": 2.0, "completed": 10.0}
    assert resp.runs.finals == 10.0 and resp.runs.duplicate_finals_suppressed == 1.0
    assert resp.voice.tts_fallbacks == 3.0
    p = resp.runs.cancel_to_ack
    assert p.count == 10 and 1.0 < p.p50_ms < 10.0 and p.p99_ms <= 100.0
    assert math.isinf(p.buckets[-1].upper_bound_ms) and p.buckets[-1].count == 10.0


def test_quantile_interpolates_and_reads_above_the_top_bucket_as_more_than_top() -> None:
    cum = [(1.0, 50.0), (2.0, 100.0), (math.inf, 100.0)]
    assert mesh_metrics.quantile(cum, 0.5) == 1.0
    assert mesh_metrics.quantile(cum, 0.75) == pytest.approx(1.5)
    above = mesh_metrics.quantile([(1.0, 0.0), (math.inf, 10.0)], 0.99)
    assert math.isinf(above) and format_ms(above, 1.0) == "> 1 ms"  # never "1 ms"
    assert mesh_metrics.quantile([], 0.5) == 0.0
    p = mesh_metrics.percentiles([(1.0, 0.0), (120.0, 1.0), (math.inf, 3.0)])
    assert math.isinf(p.p99_ms) and p.top_bound_ms == 120000.0 and p.p50_ms == math.inf


def test_cancel_buckets_reach_past_the_largest_accepted_deadline() -> None:
    assert CANCEL_BUCKETS[-1] > CANCEL_DEADLINE_MAX_S and 2.0 in CANCEL_BUCKETS
    from flynn.v1 import config_pb2

    from config_svc.validation import validate_config

    cfg = config_pb2.FlynnConfig()
    cfg.server.queue.cancel_deadline.seconds = int(CANCEL_DEADLINE_MAX_S)
    assert validate_config(cfg) == []
    cfg.server.queue.cancel_deadline.seconds = int(CANCEL_DEADLINE_MAX_S) + 1
    assert [v.field for v in validate_config(cfg)] == ["server.queue.cancel_deadline"]


def test_parse_addrs_names_a_bad_entry() -> None:
    assert mesh_metrics.parse_addrs("queue=h:1, nodes=h:2,") == {"queue": "h:1", "nodes": "h:2"}
    with pytest.raises(ValueError, match="voice"):
        mesh_metrics.parse_addrs("voice")


def snap(
    cancel_counts: list[float], dup: float = 0.0, fallbacks: float = 0.0, as_text: float = 0.0
) -> system_pb2.GetMetricsResponse:
    m = system_pb2.GetMetricsResponse()
    for le, c in zip([1.0, 100.0, 1000.0, math.inf], cancel_counts, strict=True):
        m.runs.cancel_to_ack.buckets.add(upper_bound_ms=le, count=c)
    m.runs.duplicate_finals_delivered = dup
    m.voice.tts_fallbacks = fallbacks
    m.runs.replies_by_mode.add(name="text_after_fallback", value=as_text)
    return m


def by_gate(results: list[GateResult]) -> dict[str, GateResult]:
    return {r.gate: r for r in results}


# The window tests below are about the windows, not about sample sizes.
ANY_SAMPLE = Limits().with_min_samples(dict.fromkeys(gates.MIN_SAMPLE, 0))


def test_gates_use_the_window_not_the_history() -> None:
    before = snap([0, 0, 100, 100])  # 100 slow cancels before the window
    after = snap([50, 100, 200, 200])  # 100 fast ones inside it
    r = by_gate(gates.evaluate(before, after, limits=ANY_SAMPLE))
    assert r["cancel_to_ack_p95"].result == "pass", r["cancel_to_ack_p95"]
    r = by_gate(gates.evaluate(None, after, limits=ANY_SAMPLE))  # since start: half were slow
    assert r["cancel_to_ack_p95"].result == "fail"


def test_a_restart_between_snapshots_counts_the_later_values() -> None:
    before = snap([0, 0, 100, 100], dup=0.0, fallbacks=5, as_text=5)
    after = snap([10, 10, 10, 10], dup=1.0, fallbacks=2, as_text=1)  # restarted: counters went down
    r = by_gate(gates.evaluate(before, after, limits=ANY_SAMPLE))
    assert r["cancel_to_ack_p95"].result == "pass"
    assert r["duplicate_finals"].result == "fail"
    assert r["tts_no_dropped_replies"].result == "fail"  # 2 fallbacks, only 1 sent as text


def test_unreachable_services_fail_metrics_available() -> None:
    after = snap([0, 0, 0, 0])
    after.unavailable_services.append("queue")
    assert by_gate(gates.evaluate(None, after, limits=ANY_SAMPLE))["metrics_available"].result == "fail"
    assert gates_cmds.parse_duration("2m") == 120.0 and gates_cmds.parse_duration("0") == 0.0
    with pytest.raises(ValueError):
        gates_cmds.parse_duration("soon")


def test_each_gate_is_inconclusive_below_its_minimum_sample_then_judges() -> None:
    empty = by_gate(gates.evaluate(None, system_pb2.GetMetricsResponse()))
    for gate, minimum in gates.MIN_SAMPLE.items():
        assert empty[gate].result == "inconclusive" and empty[gate].min_sample == minimum, empty[gate]
    assert gates.exit_code(empty.values()) == gates.EXIT_INCONCLUSIVE == 3
    m = snap([19, 19, 19, 19])  # 19 fast cancels: one short of 20
    assert by_gate(gates.evaluate(None, m))["cancel_to_ack_p95"].result == "inconclusive"
    m = snap([20, 20, 20, 20])
    assert by_gate(gates.evaluate(None, m))["cancel_to_ack_p95"].result == "pass"
    m = snap([0, 0, 0, 20])  # 20 cancels, all above the top bucket
    r = by_gate(gates.evaluate(None, m))["cancel_to_ack_p95"]
    assert r.result == "fail" and r.measured == "> 1000 ms", r
    m.reactions.matches, m.reactions.false_positives = 20, 1
    assert by_gate(gates.evaluate(None, m))["reaction_false_positives"].result == "fail"
    m.nodes.reconnects.add(name="success", value=10)
    assert by_gate(gates.evaluate(None, m))["node_reconnect_success"].result == "pass"
    fewer = Limits().with_min_samples({"cancel_to_ack_p95": 50})
    assert by_gate(gates.evaluate(None, m, limits=fewer))["cancel_to_ack_p95"].result == "inconclusive"
    failed_and_inconclusive = [GateResult("a", "fail", "", ""), GateResult("b", "inconclusive", "", "")]
    assert gates.exit_code(failed_and_inconclusive) == gates.EXIT_FAIL


def errors(
    finished: float, errored: float, ok: float = 0.0, caller: float = 0.0, server: float = 0.0
) -> system_pb2.GetMetricsResponse:
    m = system_pb2.GetMetricsResponse()
    m.runs.runs_finished, m.runs.runs_errored = finished, errored
    for name, value in (("ok", ok), ("caller_error", caller), ("server_error", server)):
        m.gateway.calls_by_class.add(name=name, value=value)
    return m


def test_error_rate_gate_compares_the_window_with_the_baseline() -> None:
    before = errors(100, 5, ok=1000)  # 5 % of runs in error before the change
    fine = errors(
        200, 11, ok=2000, caller=300
    )  # 6 % in the window: within 2 points; caller errors don't count
    r = by_gate(gates.evaluate(before, fine))["error_rate"]
    assert r.result == "pass" and "runs 6.00%" in r.measured and "7.00%" in r.threshold, r
    worse = errors(200, 13, ok=2000)  # 8 % in the window
    assert by_gate(gates.evaluate(before, worse))["error_rate"].result == "fail"
    gateway = errors(200, 5, ok=1900, server=100)  # runs fine, but the gateway's own failures rose
    r = by_gate(gates.evaluate(before, gateway))["error_rate"]
    assert r.result == "fail" and "gateway server errors" in r.measured, r
    # No baseline (since start): the margin is absolute; a wider margin passes it.
    assert by_gate(gates.evaluate(None, errors(100, 5)))["error_rate"].result == "fail"
    wide = Limits(error_rate_margin=0.1)
    assert by_gate(gates.evaluate(None, errors(100, 5), limits=wide))["error_rate"].result == "pass"
    assert by_gate(gates.evaluate(before, errors(110, 5)))["error_rate"].result == "inconclusive"  # 10 runs
    # No run finished, but the gateway failed every call: that fails, it is not "too little data".
    down = by_gate(gates.evaluate(None, errors(0, 0, server=50)))["error_rate"]
    assert down.result == "fail" and "gateway server errors 100.00%" in down.measured, down


def test_probe_is_self_checking() -> None:
    import hashlib

    body = gates_cmds.probe_body("abc")
    assert gates_cmds.probe_intact(body, hashlib.sha256(body).hexdigest()) == ""
    tampered = body.replace(b"abc", b"abd")
    assert "changed" in gates_cmds.probe_intact(tampered, hashlib.sha256(tampered).hexdigest())
    assert "sha256" in gates_cmds.probe_intact(body, "0" * 64)


def test_voice_note_artifact_names_are_canvas_safe_and_distinct() -> None:
    a = inbound_voice.artifact_name("telegram:42", "msg/1")
    b = inbound_voice.artifact_name("telegram_42", "msg_1")
    assert a != b and b == "inbound/telegram_42/msg_1"
    assert all(seg not in (".", "..") for seg in inbound_voice.artifact_name("..", ".").split("/"))
    long = inbound_voice.artifact_name("s" * 256, "k" * 256)
    assert len(long) <= 200


@pytest.mark.parametrize("step", list(playbook_cmds.STEPS))
def test_rollback_steps_touch_only_their_keys(step: str) -> None:
    s = playbook_cmds.STEPS[step]
    cfg = s.config()
    for path in s.paths:
        config_yaml.value_at(cfg, path)  # every masked path is a real config key
    if step == "queue":
        assert cfg.server.queue.mode == 1
    else:
        assert cfg.ByteSize() == 0  # everything masked is cleared (false / empty)
