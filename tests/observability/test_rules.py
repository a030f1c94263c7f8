"""The chart's Prometheus rules: generated from the gate definitions, valid (`promtool check rules`), and
judging each gate pass, fail and inconclusive as `flynn gates` does (`promtool test rules`).

The unit tests' input series and expected statuses are written here by hand; only the alerts'
annotation texts are read from the rules file (promtool compares them verbatim).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from flynn_runtime.gates import MIN_SAMPLE, Limits
from flynn_runtime.gates.dashboard import queries
from tests.support.mesh import ROOT

RULES = ROOT / "charts" / "flynn" / "files" / "prometheus-rules.yaml"
DASHBOARD = ROOT / "charts" / "flynn" / "files" / "grafana-dashboard.json"
PASS, FAIL, INCONCLUSIVE = 0, 1, 2


def promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.fail("promtool missing: scripts/bootstrap.sh installs the Debian package prometheus")
    return tool


def test_committed_rules_and_dashboard_are_the_generated_ones() -> None:
    out = subprocess.run(
        [sys.executable, "scripts/gen_observability.py", "--check"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_check_rules() -> None:
    out = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "SUCCESS" in out.stdout + out.stderr, out.stdout + out.stderr


def test_rules_use_the_libraries_thresholds_and_minimum_samples() -> None:
    text = RULES.read_text()
    limits = Limits()
    assert f"flynn:gate_cancel_to_ack_p95:seconds > {limits.cancel_to_ack_p95_ms / 1000:g}" in text
    assert f"flynn:gate_cancel_to_ack_sample:count < {MIN_SAMPLE['cancel_to_ack_p95']}" in text
    assert f"flynn:gate_reaction_false_positive_rate:ratio > {limits.false_positive_rate_max:g}" in text
    assert f"flynn:gate_node_reconnect_success:ratio < {limits.reconnect_success_min:g}" in text
    gates = {r["labels"]["gate"] for g in yaml.safe_load(text)["groups"] for r in g["rules"] if "record" in r
             and r["record"] == "flynn:gate_status"}  # fmt: skip
    assert gates == set(MIN_SAMPLE)


# --- promtool test rules ---------------------------------------------------------------------------
# Interval 1m, window 10m: "0+2x30" grows by 2 a minute, so 20 in any window.

Series = dict[str, str]
CANCEL_FAST = {
    'flynn_cancel_to_ack_seconds_bucket{le="0.01"}': "0+5x30",
    'flynn_cancel_to_ack_seconds_bucket{le="1"}': "0+5x30",
    'flynn_cancel_to_ack_seconds_bucket{le="+Inf"}': "0+5x30",
    "flynn_cancel_to_ack_seconds_count": "0+5x30",
}
CANCEL_SLOW = {
    'flynn_cancel_to_ack_seconds_bucket{le="0.25"}': "0+1x30",
    'flynn_cancel_to_ack_seconds_bucket{le="1"}': "0+5x30",
    'flynn_cancel_to_ack_seconds_bucket{le="+Inf"}': "0+5x30",
    "flynn_cancel_to_ack_seconds_count": "0+5x30",
}
CANCEL_FEW = {k: "0+1x30" for k in CANCEL_FAST}
FINALS = {
    'flynn_runs_total{state="completed"}': "0+2x30",
    'flynn_replies_delivered_total{mode="text"}': "0+2x30",
}
MATCHES = {'reactions_matches_total{rule="r"}': "0+10x30"}
RECONNECTS = {'nodes_reconnects_total{result="success",reason="resumed"}': "0+2x30"}
FALLBACKS = {
    'flynn_runs_total{state="completed"}': "0+2x30",
    'flynn_replies_delivered_total{mode="text"}': "0+1x30",
    'flynn_replies_delivered_total{mode="text_after_fallback"}': "0+1x30",
}
RUNS_10PCT = {'flynn_runs_total{state="completed"}': "0+9x30", 'flynn_runs_total{state="error"}': "0+1x30"}
GATEWAY_OK = {'flynn_gateway_calls_total{grpc_code="OK",code_class="ok"}': "0+100x30"}

# (gate, case, input series, expected status at 15m)
CASES: list[tuple[str, str, Series, int]] = [
    ("cancel_to_ack_p95", "fast", CANCEL_FAST, PASS),
    ("cancel_to_ack_p95", "slow", CANCEL_SLOW, FAIL),
    ("cancel_to_ack_p95", "ten cancels", CANCEL_FEW, INCONCLUSIVE),
    ("cancel_to_ack_p95", "no data", {}, INCONCLUSIVE),
    ("duplicate_finals", "none", {**FINALS, "flynn_duplicate_finals_delivered_total": "0x30"}, PASS),
    ("duplicate_finals", "one at 11m", {**FINALS, "flynn_duplicate_finals_delivered_total": "0x10 1x20"}, FAIL),
    ("duplicate_finals", "one, no finals", {"flynn_duplicate_finals_delivered_total": "0x10 1x20"}, FAIL),
    ("duplicate_finals", "no finals", {'flynn_runs_total{state="completed"}': "0x30"}, INCONCLUSIVE),
    ("reaction_false_positives", "none flagged", {**MATCHES, 'reactions_false_positives_total{rule="r"}': "0x30"}, PASS),
    ("reaction_false_positives", "10% flagged", {**MATCHES, 'reactions_false_positives_total{rule="r"}': "0+1x30"}, FAIL),
    ("reaction_false_positives", "ten matches", {'reactions_matches_total{rule="r"}': "0+1x30",
                                                 'reactions_false_positives_total{rule="r"}': "0+1x30"}, INCONCLUSIVE),
    ("node_reconnect_success", "all resumed", RECONNECTS, PASS),
    ("node_reconnect_success", "a third refused", {**RECONNECTS,
     'nodes_reconnects_total{result="failure",reason="bad_token"}': "0+1x30"}, FAIL),
    ("node_reconnect_success", "five reconnects", {'nodes_reconnects_total{result="success",reason="resumed"}': "0+0.5x30"},
     INCONCLUSIVE),
    ("tts_no_dropped_replies", "fallbacks sent as text", {**FALLBACKS, 'flynn_tts_fallbacks_total{reason="timeout"}': "0+1x30"},
     PASS),
    ("tts_no_dropped_replies", "fallbacks dropped", {**FALLBACKS, 'flynn_tts_fallbacks_total{reason="timeout"}': "0+2x30"},
     FAIL),
    ("tts_no_dropped_replies", "finals undelivered", {'flynn_runs_total{state="completed"}': "0+2x30",
     'flynn_replies_delivered_total{mode="text"}': "0+1x30"}, FAIL),
    ("tts_no_dropped_replies", "no finals", {'flynn_runs_total{state="completed"}': "0x30"}, INCONCLUSIVE),
    # 10 % of runs in error before and during the window: within the baseline's 2 points.
    ("error_rate", "as before", {**RUNS_10PCT, **GATEWAY_OK}, PASS),
    # From 10m on, 4 errors a minute: 25 of 115 in the window (22 %) against a 10 % baseline.
    ("error_rate", "runs worse", {'flynn_runs_total{state="completed"}': "0+9x30",
                                  'flynn_runs_total{state="error"}': "0+1x9 10+4x20", **GATEWAY_OK}, FAIL),
    # Runs fine, but from 10m on the gateway answers UNAVAILABLE to 30 calls a minute (no baseline).
    ("error_rate", "gateway server errors", {**RUNS_10PCT, **GATEWAY_OK,
     'flynn_gateway_calls_total{grpc_code="UNAVAILABLE",code_class="server_error"}': "0x9 0+30x20"}, FAIL),
    # Caller mistakes are not server failures.
    ("error_rate", "caller errors only", {**RUNS_10PCT, **GATEWAY_OK,
     'flynn_gateway_calls_total{grpc_code="INVALID_ARGUMENT",code_class="caller_error"}': "0+50x30"}, PASS),
    ("error_rate", "ten runs", {'flynn_runs_total{state="completed"}': "0+1x30"}, INCONCLUSIVE),
    # From 10m on no run finishes and the gateway fails every call: a failure, not "too little data".
    ("error_rate", "everything failing", {'flynn_runs_total{state="completed"}': "0+2x9 18x20",
     'flynn_gateway_calls_total{grpc_code="UNAVAILABLE",code_class="server_error"}': "0x9 0+30x20"}, FAIL),
]  # fmt: skip


def _alerts(rules: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in rules["groups"] for r in g["rules"] if "alert" in r}


def _alert_for(gate: str) -> str:
    return "FlynnGate" + "".join(p.capitalize() for p in gate.split("_")) + "Failed"


def _unit_test(gate: str, series: Series, status: int, alerts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    name = _alert_for(gate)
    rule = alerts[name]
    firing = (
        [{"exp_labels": rule["labels"], "exp_annotations": rule["annotations"]}] if status == FAIL else []
    )
    return {
        "interval": "1m",
        "input_series": [{"series": s, "values": v} for s, v in series.items()],
        "promql_expr_test": [
            {
                "expr": f'flynn:gate_status{{gate="{gate}"}}',
                "eval_time": "15m",
                "exp_samples": [{"labels": f'flynn:gate_status{{gate="{gate}"}}', "value": status}],
            }
        ],
        # Every failing case has failed since 11m at the latest: by 18m the alert (for: 5m) fires.
        "alert_rule_test": [{"eval_time": "18m", "alertname": name, "exp_alerts": firing}],
    }


def test_promtool_test_rules_each_gate_passes_fails_and_is_inconclusive(tmp_path: Path) -> None:
    rules = yaml.safe_load(RULES.read_text())
    alerts = _alerts(rules)
    tests = [_unit_test(gate, series, status, alerts) for gate, _, series, status in CASES]
    inconclusive = alerts["FlynnGateInconclusive"]
    tests.append(
        {
            "interval": "1m",
            "input_series": [{"series": k, "values": "0+1x90"} for k in CANCEL_FEW],
            "alert_rule_test": [
                {"eval_time": "30m", "alertname": "FlynnGateInconclusive", "exp_alerts": []},
                {
                    "eval_time": "75m",
                    "alertname": "FlynnGateInconclusive",
                    "exp_alerts": [
                        {
                            "exp_labels": {**inconclusive["labels"], "gate": g},
                            "exp_annotations": {
                                **inconclusive["annotations"],
                                "summary": inconclusive["annotations"]["summary"].replace(
                                    "{{ $labels.gate }}", g
                                ),
                            },
                        }
                        for g in sorted(MIN_SAMPLE)
                    ],
                },
            ],
        }
    )
    doc = {"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": tests}
    path = tmp_path / "gates_test.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    out = subprocess.run(
        [promtool(), "test", "rules", str(path)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert {g for g, *_ in CASES} == set(MIN_SAMPLE)  # every gate is covered
    assert {(g, s) for g, _, _, s in CASES} >= {
        (g, s) for g in MIN_SAMPLE for s in (PASS, FAIL, INCONCLUSIVE)
    }


def test_dashboard_is_a_sidecar_dashboard_over_the_gate_records() -> None:
    doc = json.loads(DASHBOARD.read_text())
    exprs = queries(doc)
    assert doc["uid"] and exprs and "flynn:gate_status" in exprs
    for metric in ("flynn_runs_total", "flynn_messages_by_mode_total", "flynn_cancel_to_ack_seconds_bucket",
                   "flynn_cancel_to_cancelled_seconds_bucket", "reactions_matches_total", "reactions_skips_total",
                   "nodes_online", "flynn_replies_delivered_total", "flynn_gateway_calls_total"):  # fmt: skip
        assert any(metric in e for e in exprs), metric
