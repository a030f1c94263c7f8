"""The rollout playbook gates, judged from System.GetMetrics figures (as plain dicts), and their trend.

Thresholds follow the operator playbook: cancel-to-ack p95 <= 500 ms, zero duplicate finals delivered,
reaction false-positive rate <= 3 %, node reconnect success >= 99 %, and TTS fallback with no dropped
replies (every final written was delivered, as audio or text).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

CANCEL_TO_ACK_P95_MS = 500.0
FP_RATE_MAX = 0.03
RECONNECT_SUCCESS_MIN = 0.99
TREND_SAMPLES = 120


@dataclass(frozen=True)
class GateResult:
    gate: str
    title: str
    value: float | None  # None = no data yet
    display: str
    threshold: str
    status: str  # "pass" | "fail" | "no_data"

    def as_dict(self) -> dict[str, Any]:
        return {
            "gate": self.gate,
            "title": self.title,
            "value": self.value,
            "display": self.display,
            "threshold": self.threshold,
            "status": self.status,
        }


def _num(d: dict[str, Any], *path: str) -> float:
    cur: Any = d
    for p in path:
        if not isinstance(cur, dict):
            return 0.0
        cur = cur.get(p, 0)
    try:
        return float(cur or 0)
    except (TypeError, ValueError):
        return 0.0


def _counts(d: dict[str, Any], *path: str) -> dict[str, float]:
    cur: Any = d
    for p in path:
        cur = cur.get(p, {}) if isinstance(cur, dict) else {}
    out: dict[str, float] = {}
    for item in cur if isinstance(cur, list) else []:
        out[str(item.get("name", ""))] = float(item.get("value", 0) or 0)
    return out


def evaluate(metrics: dict[str, Any]) -> list[GateResult]:
    """Pass/fail of every playbook gate for one GetMetrics answer (MessageToDict, proto field names)."""
    out: list[GateResult] = []

    n_cancels = _num(metrics, "runs", "cancel_to_ack", "count")
    p95 = _num(metrics, "runs", "cancel_to_ack", "p95_ms")
    out.append(
        GateResult(
            "cancel_to_ack_p95",
            "Cancel-to-ack p95",
            p95 if n_cancels else None,
            f"{p95:.1f} ms ({int(n_cancels)} cancels)" if n_cancels else "no cancels yet",
            f"≤ {CANCEL_TO_ACK_P95_MS:.0f} ms",
            "no_data" if not n_cancels else ("pass" if p95 <= CANCEL_TO_ACK_P95_MS else "fail"),
        )
    )

    dup = _num(metrics, "runs", "duplicate_finals_delivered")
    out.append(
        GateResult(
            "duplicate_finals",
            "Duplicate finals delivered",
            dup,
            f"{int(dup)}",
            "= 0",
            "pass" if dup == 0 else "fail",
        )
    )

    matches = _num(metrics, "reactions", "matches")
    fp_rate = _num(metrics, "reactions", "false_positive_rate")
    out.append(
        GateResult(
            "reaction_fp_rate",
            "Reaction false-positive rate",
            fp_rate if matches else None,
            f"{fp_rate * 100:.2f} % of {int(matches)} matches" if matches else "no matches yet",
            f"≤ {FP_RATE_MAX * 100:.0f} %",
            "no_data" if not matches else ("pass" if fp_rate <= FP_RATE_MAX else "fail"),
        )
    )

    reconnects = sum(_counts(metrics, "nodes", "reconnects").values())
    rate = _num(metrics, "nodes", "reconnect_success_rate")
    out.append(
        GateResult(
            "node_reconnect_success",
            "Node reconnect success",
            rate if reconnects else None,
            f"{rate * 100:.2f} % of {int(reconnects)} reconnects" if reconnects else "no reconnects yet",
            f"≥ {RECONNECT_SUCCESS_MIN * 100:.0f} %",
            "no_data" if not reconnects else ("pass" if rate >= RECONNECT_SUCCESS_MIN else "fail"),
        )
    )

    finals = _num(metrics, "runs", "finals")
    by_mode = _counts(metrics, "runs", "replies_by_mode")
    delivered = sum(by_mode.values())
    fallbacks = _num(metrics, "voice", "tts_fallbacks")
    dropped = max(finals - delivered, 0.0)
    out.append(
        GateResult(
            "tts_fallback_no_drops",
            "TTS fallback, no dropped replies",
            dropped if finals else None,
            f"{int(fallbacks)} fallbacks, {int(dropped)} of {int(finals)} finals undelivered"
            if finals
            else f"{int(fallbacks)} fallbacks, no finals yet",
            "0 undelivered",
            "no_data" if not finals else ("pass" if dropped == 0 else "fail"),
        )
    )
    return out


class TrendWindow:
    """The last TREND_SAMPLES gate values, for the inline trend charts (kept in memory only)."""

    def __init__(self, size: int = TREND_SAMPLES) -> None:
        self._samples: deque[tuple[float, dict[str, float | None]]] = deque(maxlen=size)

    def add(self, gates: list[GateResult], at: float | None = None) -> None:
        self._samples.append((time.time() if at is None else at, {g.gate: g.value for g in gates}))

    def series(self) -> dict[str, list[tuple[float, float]]]:
        out: dict[str, list[tuple[float, float]]] = {}
        for at, values in self._samples:
            for gate, value in values.items():
                if value is not None:
                    out.setdefault(gate, []).append((at, value))
        return out


def compare(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Row per gate: before and after display value and status, and whether the status changed."""
    b = {g["gate"]: g for g in before}
    rows = []
    for g in after:
        old = b.get(g["gate"])
        rows.append(
            {
                "gate": g["gate"],
                "title": g["title"],
                "before": old["display"] if old else "—",
                "before_status": old["status"] if old else "no_data",
                "after": g["display"],
                "after_status": g["status"],
                "changed": (old or {}).get("status") != g["status"],
            }
        )
    return rows
