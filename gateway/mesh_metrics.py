"""system.metrics: the rollout-gate figures of every service, read from their Prometheus /metrics pages.

No gRPC here: parse the text exposition format, pick the metrics each service's metrics.py defines,
and fill a GetMetricsResponse. Percentiles come from the histogram buckets (linear interpolation
inside the bucket, as Prometheus' histogram_quantile does); the cumulative buckets are returned as
well, so a caller can compute percentiles over a window from two answers (see flynn_cli/gates_cmds.py).
"""

from __future__ import annotations

import math
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from flynn.v1 import system_pb2
from prometheus_client.parser import text_string_to_metric_families

from flynn_runtime.histograms import quantile, top_bound
from flynn_runtime.metrics import code_class

SCRAPE_TIMEOUT = 1.0
FINISHED_STATES = ("completed", "cancelled", "error")
MAX_PAGE_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class Sample:
    name: str
    labels: Mapping[str, str]
    value: float


def parse_addrs(text: str) -> dict[str, str]:
    """`queue=host:port,nodes=host:port` → {service: host:port}; raises ValueError naming a bad entry."""
    out: dict[str, str] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, addr = part.partition("=")
        if not sep or not name.strip() or ":" not in addr:
            raise ValueError(f"bad metrics address {part!r}: expected service=host:port")
        out[name.strip()] = addr.strip()
    return out


def fetch(addr: str, timeout: float = SCRAPE_TIMEOUT) -> str:
    """GET http://addr/metrics (blocking; run it in a thread)."""
    url = addr if addr.startswith("http") else f"http://{addr}/metrics"
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - operator-configured address
        body: bytes = resp.read(MAX_PAGE_BYTES)
    return body.decode("utf-8", errors="replace")


def parse(text: str) -> list[Sample]:
    out: list[Sample] = []
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.append(Sample(s.name, dict(s.labels), float(s.value)))
    return out


def total(samples: Iterable[Sample], name: str, **match: str) -> float:
    return sum(
        s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in match.items())
    )


def by_labels(
    samples: Iterable[Sample], name: str, labels: tuple[str, ...], **match: str
) -> dict[str, float]:
    """Sum of `name` grouped by the values of `labels` joined with '/'."""
    out: dict[str, float] = {}
    for s in samples:
        if s.name != name or not all(s.labels.get(k) == v for k, v in match.items()):
            continue
        key = "/".join(s.labels.get(lb, "") for lb in labels)
        out[key] = out.get(key, 0.0) + s.value
    return out


def buckets(samples: Iterable[Sample], name: str) -> list[tuple[float, float]]:
    """Cumulative (upper bound in seconds, count) of histogram `name`, summed over its other labels."""
    acc: dict[float, float] = {}
    for s in samples:
        if s.name == f"{name}_bucket":
            le = float(s.labels.get("le", "+Inf"))
            acc[le] = acc.get(le, 0.0) + s.value
    return sorted(acc.items())


def percentiles(cumulative: list[tuple[float, float]], scale_ms: float = 1000.0) -> system_pb2.Percentiles:
    """Percentiles message (milliseconds) from cumulative buckets given in seconds."""
    p = system_pb2.Percentiles(
        count=int(cumulative[-1][1]) if cumulative else 0,
        p50_ms=quantile(cumulative, 0.50) * scale_ms,
        p95_ms=quantile(cumulative, 0.95) * scale_ms,
        p99_ms=quantile(cumulative, 0.99) * scale_ms,
        top_bound_ms=top_bound(cumulative) * scale_ms,
    )
    for bound, count in cumulative:
        p.buckets.add(upper_bound_ms=bound * scale_ms if not math.isinf(bound) else math.inf, count=count)
    return p


def percentiles_from_ms_buckets(b: Iterable[system_pb2.HistogramBucket]) -> system_pb2.Percentiles:
    """Recompute a Percentiles message from (possibly delta) buckets already in milliseconds."""
    cum = sorted((x.upper_bound_ms, x.count) for x in b)
    return percentiles(cum, scale_ms=1.0)


def named(d: Mapping[str, float]) -> list[system_pb2.NamedCount]:
    return [system_pb2.NamedCount(name=k, value=v) for k, v in sorted(d.items())]


def fill_runs(out: system_pb2.RunMetrics, s: list[Sample]) -> None:
    states = by_labels(s, "flynn_runs_total", ("state",))
    out.run_states.extend(named(states))
    out.cancel_to_ack.CopyFrom(percentiles(buckets(s, "flynn_cancel_to_ack_seconds")))
    out.cancel_to_cancelled.CopyFrom(percentiles(buckets(s, "flynn_cancel_to_cancelled_seconds")))
    out.submit_to_final.CopyFrom(percentiles(buckets(s, "flynn_submit_to_final_seconds")))
    out.duplicate_finals_suppressed = total(s, "flynn_duplicate_finals_suppressed_total")
    out.duplicate_finals_delivered = total(s, "flynn_duplicate_finals_delivered_total")
    out.dropped_messages.extend(named(by_labels(s, "flynn_messages_dropped_total", ("reason",))))
    out.replies_by_mode.extend(named(by_labels(s, "flynn_replies_delivered_total", ("mode",))))
    out.messages.extend(named(by_labels(s, "flynn_messages_total", ("disposition",))))
    out.finals = states.get("completed", 0.0)
    out.runs_finished = sum(states.get(k, 0.0) for k in FINISHED_STATES)
    out.runs_errored = states.get("error", 0.0)
    out.active_runs = total(s, "flynn_runs_active")
    out.queue_depth = total(s, "flynn_queue_depth")


def fill_gateway(out: system_pb2.GatewayMetrics, s: list[Sample]) -> None:
    """The gateway's calls by status class, and its failures by class and code."""
    codes = by_labels(s, "flynn_gateway_calls_total", ("grpc_code",))
    classes: dict[str, float] = {}
    failures: dict[str, float] = {}
    for code, n in codes.items():
        cls = code_class(code)
        classes[cls] = classes.get(cls, 0.0) + n
        if cls != "ok":
            failures[f"{cls}/{code}"] = n
    out.calls_by_class.extend(named(classes))
    out.failures_by_code.extend(named(failures))


def fill_reactions(out: system_pb2.ReactionMetrics, s: list[Sample]) -> None:
    out.matches = total(s, "reactions_matches_total")
    out.skips.extend(named(by_labels(s, "reactions_skips_total", ("reason",))))
    out.false_positives = total(s, "reactions_false_positives_total")
    out.false_positive_rate = out.false_positives / out.matches if out.matches else 0.0
    out.matches_by_rule.extend(named(by_labels(s, "reactions_matches_total", ("rule",))))
    out.actions.extend(named(by_labels(s, "reactions_actions_total", ("kind", "outcome"))))


def fill_nodes(out: system_pb2.NodeMetrics, s: list[Sample]) -> None:
    out.online = total(s, "nodes_online")
    out.registrations = total(s, "nodes_registrations_total", result="ok")
    reconnects = by_labels(s, "nodes_reconnects_total", ("result",))
    out.reconnects.extend(named(reconnects))
    attempts = sum(reconnects.values())
    out.reconnect_success_rate = reconnects.get("success", 0.0) / attempts if attempts else 1.0
    out.canvas_operations.extend(named(by_labels(s, "canvas_ops_total", ("op", "result"))))
    out.registrations_by_result.extend(named(by_labels(s, "nodes_registrations_total", ("result", "reason"))))
    out.disconnects.extend(named(by_labels(s, "nodes_disconnects_total", ("reason",))))


def fill_voice(out: system_pb2.VoiceMetrics, s: list[Sample]) -> None:
    out.tts_requests = total(s, "voice_requests_total", method="Synthesize") + total(
        s, "voice_requests_total", method="StreamSynthesize"
    )
    out.tts_failures.extend(
        named(by_labels(s, "voice_engine_failures_total", ("engine", "cause"), kind="tts"))
    )
    out.transcriptions.extend(named(by_labels(s, "voice_requests_total", ("outcome",), method="Transcribe")))


def fill_queue_voice(out: system_pb2.VoiceMetrics, s: list[Sample]) -> None:
    """Fallbacks are counted by run control, which owns the reply (the text goes out either way)."""
    fallbacks = by_labels(s, "flynn_tts_fallbacks_total", ("reason",))
    out.tts_fallbacks = sum(fallbacks.values())
    out.tts_fallbacks_by_reason.extend(named(fallbacks))


def build(scraped: Mapping[str, list[Sample]]) -> system_pb2.GetMetricsResponse:
    """The answer from each reachable service's samples (service name → samples)."""
    resp = system_pb2.GetMetricsResponse()
    if "queue" in scraped:
        fill_runs(resp.runs, scraped["queue"])
        fill_queue_voice(resp.voice, scraped["queue"])
    if "reactions" in scraped:
        fill_reactions(resp.reactions, scraped["reactions"])
    if "nodes" in scraped:
        fill_nodes(resp.nodes, scraped["nodes"])
    if "voice" in scraped:
        fill_voice(resp.voice, scraped["voice"])
    if "gateway" in scraped:
        fill_gateway(resp.gateway, scraped["gateway"])
    if "config" in scraped:
        resp.head_revision = int(total(scraped["config"], "config_head_revision"))
    return resp
