"""The Rollout view's rows, trends and snapshot comparison around the playbook gates.

The verdicts (pass, fail, inconclusive, skip) come from one place, the shared gates library
(flynn_runtime.gates.evaluate over System.GetMetrics answers) that `flynn gates` and the Prometheus
rules use too, so the console and the command never disagree. This module only shapes its results
for the page, extracts a number per gate for the trend charts, keeps the trend window and compares
two snapshots.
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Any

from flynn_runtime.gates import TITLES

TREND_SAMPLES = 120


def gate_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """flynn gates results (gate, result, measured, threshold, note) as the page's rows."""
    rows = []
    for r in results:
        note = str(r.get("note", ""))
        rows.append(
            {
                "gate": r["gate"],
                "title": TITLES.get(r["gate"], r["gate"]),
                "status": r["result"],
                "display": str(r["measured"]) + (f" ({note})" if note else ""),
                "threshold": str(r["threshold"]),
                "no_observations": note == "no observations",
                "inconclusive": r["result"] == "inconclusive",
                "sample": r.get("sample"),
                "min_sample": r.get("min_sample", 0),
            }
        )
    return rows


def _num(d: dict[str, Any], *path: str) -> float:
    cur: Any = d
    for p in path:
        if not isinstance(cur, dict):
            return 0.0
        cur = cur.get(p, 0)
    try:
        value = float(cur or 0)  # proto JSON spells an unknown percentile "Infinity"
    except (TypeError, ValueError):
        return 0.0
    return value if math.isfinite(value) else _num(d, *path[:-1], "top_bound_ms")


def _named(d: dict[str, Any], *path: str) -> dict[str, float]:
    cur: Any = d
    for p in path:
        cur = cur.get(p, {}) if isinstance(cur, dict) else {}
    return {
        str(i.get("name", "")): float(i.get("value", 0) or 0) for i in (cur if isinstance(cur, list) else [])
    }


def trend_values(metrics: dict[str, Any]) -> dict[str, float | None]:
    """One number per gate from a GetMetrics answer (proto field names), None when nothing to measure."""
    cancels = _num(metrics, "runs", "cancel_to_ack", "count")
    matches = _num(metrics, "reactions", "matches")
    rec = _named(metrics, "nodes", "reconnects")
    attempts = sum(rec.values())
    finals = _num(metrics, "runs", "finals")
    delivered = sum(_named(metrics, "runs", "replies_by_mode").values())
    finished = _num(metrics, "runs", "runs_finished")
    return {
        "cancel_to_ack_p95": _num(metrics, "runs", "cancel_to_ack", "p95_ms") if cancels else None,
        "duplicate_finals": _num(metrics, "runs", "duplicate_finals_delivered"),
        "reaction_false_positives": _num(metrics, "reactions", "false_positives") / matches
        if matches
        else None,
        "node_reconnect_success": rec.get("success", 0.0) / attempts if attempts else None,
        "tts_no_dropped_replies": max(finals - delivered, 0.0) if finals else None,
        "error_rate": _num(metrics, "runs", "runs_errored") / finished if finished else None,
    }


class TrendWindow:
    """The last TREND_SAMPLES values of each gate, for the inline trend charts (in memory only)."""

    def __init__(self, size: int = TREND_SAMPLES) -> None:
        self._samples: deque[tuple[float, dict[str, float | None]]] = deque(maxlen=size)

    def add(self, values: dict[str, float | None], at: float | None = None) -> None:
        self._samples.append((time.time() if at is None else at, dict(values)))

    def series(self) -> dict[str, list[tuple[float, float]]]:
        out: dict[str, list[tuple[float, float]]] = {}
        for at, values in self._samples:
            for gate, value in values.items():
                if value is not None:
                    out.setdefault(gate, []).append((at, value))
        return out


def compare(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Row per gate: before and after value and status, and whether the status changed."""
    b = {g["gate"]: g for g in before}
    rows = []
    for g in after:
        old = b.get(g["gate"])
        rows.append(
            {
                "gate": g["gate"],
                "title": g["title"],
                "before": old["display"] if old else "—",
                "before_status": old["status"] if old else "skip",
                "after": g["display"],
                "after_status": g["status"],
                "changed": (old or {}).get("status") != g["status"],
            }
        )
    return rows
