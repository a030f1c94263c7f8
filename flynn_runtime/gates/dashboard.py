"""The canary dashboard (Grafana JSON) over the recording rules of promql.py and the services' metrics.

Rows: the gates (status and value per gate), run states and queue modes, cancel latency buckets,
reactions matched and skipped by reason, nodes, voice deliveries by mode, and the gateway's calls by
status class. Queries use Grafana's `$__rate_interval` and a `datasource` variable; every query is
run against a real Prometheus by tests/observability (with the variable replaced as Grafana does).
"""

from __future__ import annotations

from typing import Any

from flynn_runtime.gates.limits import TITLES, Limits
from flynn_runtime.gates.promql import STATUS, gate_rules

UID = "flynn-canary"
DS = {"type": "prometheus", "uid": "${datasource}"}
RI = "$__rate_interval"


def _panel(
    pid: int,
    title: str,
    targets: list[tuple[str, str]],
    grid: tuple[int, int, int, int],
    kind: str = "timeseries",
) -> dict[str, Any]:
    x, y, w, h = grid
    return {
        "id": pid,
        "type": kind,
        "title": title,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(targets)
        ],
    }


def _status_panel() -> dict[str, Any]:
    p = _panel(
        1, "Rollout gates (0 pass, 1 fail, 2 inconclusive)", [(STATUS, "{{gate}}")], (0, 0, 24, 5), "stat"
    )
    p["fieldConfig"] = {
        "defaults": {
            "mappings": [
                {"type": "value", "options": {"0": {"text": "PASS", "color": "green"},
                                              "1": {"text": "FAIL", "color": "red"},
                                              "2": {"text": "INCONCLUSIVE", "color": "orange"}}}
            ],
            "color": {"mode": "thresholds"},
            "thresholds": {"mode": "absolute", "steps": [{"color": "green", "value": None},
                                                          {"color": "red", "value": 1},
                                                          {"color": "orange", "value": 2}]},
        }
    }  # fmt: skip
    p["options"] = {
        "colorMode": "background",
        "textMode": "value_and_name",
        "reduceOptions": {"calcs": ["lastNotNull"]},
    }
    return p


def _gate_value_panels(limits: Limits, y: int) -> list[dict[str, Any]]:
    out = []
    for i, rule in enumerate(gate_rules(limits, "10m")):
        targets = [(name, name.split(":")[1]) for name, _ in rule.records]
        out.append(_panel(10 + i, TITLES[rule.gate], targets, ((i % 3) * 8, y + (i // 3) * 7, 8, 7)))
    return out


def _mesh_panels(y: int) -> list[dict[str, Any]]:
    def rate(metric: str, by: str) -> str:
        return f"sum by ({by}) (rate({metric}[{RI}]))"

    cancel = "sum by (le) (increase(flynn_cancel_to_{}_seconds_bucket[" + RI + "]))"
    heat = [
        _panel(31, "Cancel to ack: latency buckets", [(cancel.format("ack"), "{{le}}")], (0, y + 7, 12, 8), "heatmap"),
        _panel(32, "Cancel to cancelled: latency buckets", [(cancel.format("cancelled"), "{{le}}")],
               (12, y + 7, 12, 8), "heatmap"),
    ]  # fmt: skip
    for p in heat:
        p["targets"][0]["format"] = "heatmap"
    return [
        _panel(20, "Run states (transitions/s)", [(rate("flynn_runs_total", "state"), "{{state}}")], (0, y, 8, 7)),
        _panel(21, "Messages by queue mode (/s)", [(rate("flynn_messages_by_mode_total", "mode"), "{{mode}}")],
               (8, y, 8, 7)),
        _panel(22, "Active runs and queue depth",
               [("sum(flynn_runs_active)", "active runs"), ("sum(flynn_queue_depth)", "queued")], (16, y, 8, 7)),
        *heat,
        _panel(40, "Reactions matched by rule (/s)", [(rate("reactions_matches_total", "rule"), "{{rule}}")],
               (0, y + 15, 12, 7)),
        _panel(41, "Reactions skipped by reason (/s)", [(rate("reactions_skips_total", "reason"), "{{reason}}")],
               (12, y + 15, 12, 7)),
        _panel(50, "Nodes online", [("sum(nodes_online)", "online")], (0, y + 22, 8, 7)),
        _panel(51, "Node registrations by result (/s)",
               [(rate("nodes_registrations_total", "result, reason"), "{{result}} {{reason}}")], (8, y + 22, 8, 7)),
        _panel(52, "Node reconnects by result (/s)", [(rate("nodes_reconnects_total", "result"), "{{result}}")],
               (16, y + 22, 8, 7)),
        _panel(60, "Voice: replies delivered by mode (/s)",
               [(rate("flynn_replies_delivered_total", "mode"), "{{mode}}")], (0, y + 29, 12, 7)),
        _panel(61, "Voice: TTS fallbacks by reason (/s)", [(rate("flynn_tts_fallbacks_total", "reason"), "{{reason}}")],
               (12, y + 29, 12, 7)),
        _panel(70, "Gateway calls by status class (/s)",
               [(rate("flynn_gateway_calls_total", "code_class"), "{{code_class}}")], (0, y + 36, 24, 7)),
    ]  # fmt: skip


def dashboard(limits: Limits | None = None) -> dict[str, Any]:
    """The dashboard document (what Grafana's sidecar loads from the ConfigMap)."""
    lim = limits or Limits()
    panels = [_status_panel(), *_gate_value_panels(lim, 5), *_mesh_panels(19)]
    return {
        "uid": UID,
        "title": "Flynn canary",
        "description": "Rollout gates and the figures behind them (charts/flynn; generated by "
        "scripts/gen_observability.py from flynn_runtime/gates).",
        "tags": ["flynn", "rollout"],
        "schemaVersion": 39,
        "version": 1,
        "editable": False,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"}
            ]
        },
        "panels": panels,
    }


def queries(doc: dict[str, Any]) -> list[str]:
    """Every PromQL expression of a dashboard document."""
    return [t["expr"] for p in doc.get("panels", []) for t in p.get("targets", []) if t.get("expr")]
