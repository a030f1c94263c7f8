"""`flynn gates ...`: the rollout playbook's gates, evaluated from live figures (System.GetMetrics).

    flynn gates check [--window 60s] [--json] [--skip GATE]   # exit 1 when a gate fails
    flynn gates snapshot -o before.json
    flynn gates compare before.json after.json [--json]       # exit 1 when a gate fails between them

A window is the difference of two GetMetrics answers taken `--window` apart (counters and histogram
buckets are subtracted; a counter that went down means its process restarted, and the later value is
the delta). `--window 0` evaluates everything since each process started.

Gates (docs/operations/ROLLOUT.md):
  metrics_available        every service's figures could be read
  cancel_to_ack_p95        p95 of CancelRun → cancel_requested durable ≤ 500 ms
  duplicate_finals         no second final delivered for any run (suppressed ones are shown)
  reaction_false_positives flagged false positives / matches ≤ 3%
  node_reconnect_success   successful reconnects / reconnect attempts ≥ 99%
  canvas_persistence       the probe left by the previous check still has its sha256 (it survived any
                           restart in between), and a new probe written now reads back intact
  tts_no_dropped_replies   every TTS fallback was delivered as text, and finals ≤ replies delivered
A gate with nothing to measure in the window passes with "no observations".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
from flynn.v1 import canvas_pb2, canvas_pb2_grpc, system_pb2, system_pb2_grpc
from google.protobuf import json_format

from flynn_cli import rpc
from flynn_runtime.histograms import quantile

CANCEL_TO_ACK_P95_MS = 500.0
FALSE_POSITIVE_RATE_MAX = 0.03
RECONNECT_SUCCESS_MIN = 0.99
PROBE_NAME = "gates/persistence-probe"
GATE_NAMES = (
    "metrics_available",
    "cancel_to_ack_p95",
    "duplicate_finals",
    "reaction_false_positives",
    "node_reconnect_success",
    "canvas_persistence",
    "tts_no_dropped_replies",
)
REQUIRED_SERVICES = ("queue", "reactions", "nodes", "voice")


@dataclass
class GateResult:
    gate: str
    result: str  # pass | fail | skip
    measured: str
    threshold: str
    note: str = ""

    @property
    def failed(self) -> bool:
        return self.result == "fail"


def register(sub: Any) -> None:
    p = sub.add_parser("gates", help="rollout gates: check, snapshot, compare (docs/operations/ROLLOUT.md)")
    cmds = p.add_subparsers(dest="command", metavar="<command>")
    cmds.required = True

    c = cmds.add_parser(
        "check", help="evaluate every gate over a window of live figures; exit 1 on a failure"
    )
    c.add_argument(
        "--window", default="60s", help="time between the two samples, e.g. 30s, 2m, 0 (default 60s)"
    )
    c.add_argument("--json", action="store_true", help="print the results as JSON")
    c.add_argument(
        "--skip", action="append", default=[], choices=GATE_NAMES, help="do not evaluate this gate"
    )
    c.add_argument("--probe-name", default=PROBE_NAME, help=f"canvas probe artifact (default {PROBE_NAME})")
    c.set_defaults(func=cmd_check)

    c = cmds.add_parser("snapshot", help="save the current figures (System.GetMetrics) to a JSON file")
    c.add_argument("-o", "--output", type=Path, required=True)
    c.set_defaults(func=cmd_snapshot)

    c = cmds.add_parser("compare", help="before/after of two snapshots, and the gates between them")
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_compare)


# --- durations and figures --------------------------------------------------------------------------

_DURATION = re.compile(r"^(?P<n>\d+(?:\.\d+)?)(?P<unit>ms|s|m|h)?$")


def parse_duration(text: str) -> float:
    m = _DURATION.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a duration (e.g. 30s, 2m, 500ms, 0)")
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}[m["unit"]]
    return float(m["n"]) * scale


def _named(items: Iterable[system_pb2.NamedCount]) -> dict[str, float]:
    return {i.name: i.value for i in items}


def _delta(before: float, after: float) -> float:
    """A counter's increase; a decrease means the process restarted and counted from zero."""
    return after - before if after >= before else after


def _delta_named(
    before: Iterable[system_pb2.NamedCount], after: Iterable[system_pb2.NamedCount]
) -> dict[str, float]:
    b, a = _named(before), _named(after)
    return {k: _delta(b.get(k, 0.0), v) for k, v in a.items()}


def _delta_buckets(
    before: system_pb2.Percentiles, after: system_pb2.Percentiles
) -> list[tuple[float, float]]:
    b = {x.upper_bound_ms: x.count for x in before.buckets}
    a = sorted((x.upper_bound_ms, x.count) for x in after.buckets)
    if a and b and a[-1][1] < b.get(a[-1][0], 0.0):  # restarted: the after histogram is the window
        return a
    return [(le, max(c - b.get(le, 0.0), 0.0)) for le, c in a]


# --- gates ------------------------------------------------------------------------------------------


def evaluate(
    before: system_pb2.GetMetricsResponse | None,
    after: system_pb2.GetMetricsResponse,
    skip: Iterable[str] = (),
) -> list[GateResult]:
    """The figure gates between two answers (before None: since each process started)."""
    b = before if before is not None else system_pb2.GetMetricsResponse()
    skipped = set(skip)
    out: list[GateResult] = []

    missing = sorted(set(after.unavailable_services) | (set(b.unavailable_services) if before else set()))
    needed = [s for s in missing if s in REQUIRED_SERVICES]
    out.append(
        GateResult(
            "metrics_available",
            "fail" if needed else "pass",
            "unreachable: " + ", ".join(missing) if missing else "all services read",
            "queue, reactions, nodes, voice readable",
            "; ".join(after.unavailable_details),
        )
    )

    cum = _delta_buckets(b.runs.cancel_to_ack, after.runs.cancel_to_ack)
    n = cum[-1][1] if cum else 0.0
    if n <= 0:
        out.append(
            GateResult(
                "cancel_to_ack_p95",
                "pass",
                "no cancels",
                f"<= {CANCEL_TO_ACK_P95_MS:.0f} ms",
                "no observations",
            )
        )
    else:
        p95 = quantile(cum, 0.95)
        out.append(
            GateResult(
                "cancel_to_ack_p95",
                "pass" if p95 <= CANCEL_TO_ACK_P95_MS else "fail",
                f"{p95:.1f} ms",
                f"<= {CANCEL_TO_ACK_P95_MS:.0f} ms",
                f"{int(n)} cancels; cancel-to-cancelled p95 "
                f"{quantile(_delta_buckets(b.runs.cancel_to_cancelled, after.runs.cancel_to_cancelled), 0.95):.1f} ms",
            )
        )

    dup = _delta(b.runs.duplicate_finals_delivered, after.runs.duplicate_finals_delivered)
    sup = _delta(b.runs.duplicate_finals_suppressed, after.runs.duplicate_finals_suppressed)
    out.append(
        GateResult(
            "duplicate_finals",
            "pass" if dup == 0 else "fail",
            f"{dup:.0f} delivered",
            "== 0",
            f"{sup:.0f} suppressed by the outbox",
        )
    )

    matches = _delta(b.reactions.matches, after.reactions.matches)
    fps = _delta(b.reactions.false_positives, after.reactions.false_positives)
    if matches <= 0:
        out.append(
            GateResult(
                "reaction_false_positives",
                "pass",
                "no matches",
                f"<= {FALSE_POSITIVE_RATE_MAX:.0%}",
                "no observations",
            )
        )
    else:
        rate = fps / matches
        out.append(
            GateResult(
                "reaction_false_positives",
                "pass" if rate <= FALSE_POSITIVE_RATE_MAX else "fail",
                f"{rate:.2%}",
                f"<= {FALSE_POSITIVE_RATE_MAX:.0%}",
                f"{fps:.0f} flagged of {matches:.0f} matches",
            )
        )

    rec = _delta_named(b.nodes.reconnects, after.nodes.reconnects)
    attempts = sum(rec.values())
    if attempts <= 0:
        out.append(
            GateResult(
                "node_reconnect_success",
                "pass",
                "no reconnects",
                f">= {RECONNECT_SUCCESS_MIN:.0%}",
                "no observations",
            )
        )
    else:
        rate = rec.get("success", 0.0) / attempts
        out.append(
            GateResult(
                "node_reconnect_success",
                "pass" if rate >= RECONNECT_SUCCESS_MIN else "fail",
                f"{rate:.2%}",
                f">= {RECONNECT_SUCCESS_MIN:.0%}",
                f"{rec.get('success', 0.0):.0f} of {attempts:.0f} reconnects",
            )
        )

    fallbacks = _delta(b.voice.tts_fallbacks, after.voice.tts_fallbacks)
    modes = _delta_named(b.runs.replies_by_mode, after.runs.replies_by_mode)
    as_text = modes.get("text_after_fallback", 0.0)
    delivered = sum(modes.values())
    finals = _delta(b.runs.finals, after.runs.finals)
    ok = as_text >= fallbacks and delivered >= finals
    out.append(
        GateResult(
            "tts_no_dropped_replies",
            "pass" if ok else "fail",
            f"{fallbacks:.0f} fallbacks, {as_text:.0f} sent as text; {finals:.0f} finals, {delivered:.0f} replies delivered",
            "fallbacks <= text_after_fallback and finals <= delivered",
            "replies by mode: " + ", ".join(f"{k}={v:.0f}" for k, v in sorted(modes.items())),
        )
    )
    return [r for r in out if r.gate not in skipped]


def probe_body(nonce: str) -> bytes:
    """Self-checking content: its last line is the sha256 of what precedes it."""
    body = f"flynn gates canvas persistence probe\nwritten {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\nnonce {nonce}\n"
    digest = hashlib.sha256(body.encode()).hexdigest()
    return f"{body}sha256 {digest}\n".encode()


def probe_intact(content: bytes, stored_sha256: str) -> str:
    """'' when the content is a probe whose own checksum and the stored sha256 both match, else why not."""
    if hashlib.sha256(content).hexdigest() != stored_sha256:
        return "the content does not match the sha256 the canvas recorded"
    text = content.decode("utf-8", errors="replace")
    body, sep, last = text.rstrip("\n").rpartition("\n")
    if not sep or not last.startswith("sha256 "):
        return "the content is not a gates probe"
    if hashlib.sha256(f"{body}\n".encode()).hexdigest() != last.removeprefix("sha256 "):
        return "the content changed since it was written (its own checksum does not match)"
    return ""


def canvas_probe(args: argparse.Namespace) -> GateResult:
    stub = canvas_pb2_grpc.CanvasStub(rpc.channel(args))
    kw = {"metadata": rpc.metadata(args), "timeout": args.timeout}
    threshold = "previous probe intact; new probe reads back intact"
    notes: list[str] = []
    etag = ""
    try:
        prev = stub.GetArtifact(canvas_pb2.GetArtifactRequest(name=args.probe_name), **kw).artifact
        why = probe_intact(prev.content, prev.sha256)
        if why:
            return GateResult(
                "canvas_persistence", "fail", f"previous probe v{prev.version}: {why}", threshold
            )
        notes.append(f"previous probe v{prev.version} intact ({prev.sha256[:12]}…)")
        etag = prev.etag
    except grpc.RpcError as e:
        code = e.code() if isinstance(e, grpc.Call) else None
        if code == grpc.StatusCode.FAILED_PRECONDITION and "CANVAS_DISABLED" in _reason(e):
            return GateResult(
                "canvas_persistence",
                "skip",
                "canvas is off",
                threshold,
                "server.nodes.feature_gates.ui.canvas is false",
            )
        if code != grpc.StatusCode.NOT_FOUND:
            return GateResult(
                "canvas_persistence", "fail", f"cannot read the probe: {_describe(e)}", threshold
            )
        notes.append("no previous probe (first check)")
    content = probe_body(hashlib.sha256(str(time.time_ns()).encode()).hexdigest()[:16])
    try:
        put = stub.PutArtifact(
            canvas_pb2.PutArtifactRequest(
                name=args.probe_name, content_type="text/plain", content=content, etag=etag
            ),
            **kw,
        ).artifact
        got = stub.GetArtifact(
            canvas_pb2.GetArtifactRequest(name=args.probe_name, version=put.version), **kw
        ).artifact
    except grpc.RpcError as e:
        return GateResult("canvas_persistence", "fail", f"probe write/read failed: {_describe(e)}", threshold)
    expected = hashlib.sha256(content).hexdigest()
    if got.content != content or got.sha256 != expected:
        return GateResult(
            "canvas_persistence", "fail", f"probe v{put.version} read back different", threshold
        )
    notes.append(f"new probe v{put.version} written and read back ({expected[:12]}…)")
    return GateResult("canvas_persistence", "pass", "intact", threshold, "; ".join(notes))


def _reason(e: grpc.RpcError) -> str:
    from flynn_runtime.rich_status import from_rpc_error

    try:
        rich = from_rpc_error(e)
    except Exception:  # noqa: BLE001 - no rich details: no reason
        return ""
    return rich.reason if rich is not None else ""


def _describe(e: grpc.RpcError) -> str:
    if isinstance(e, grpc.Call):
        return f"{e.code().name}: {e.details()}"
    return str(e)


def get_metrics(args: argparse.Namespace) -> system_pb2.GetMetricsResponse | None:
    stub = system_pb2_grpc.SystemStub(rpc.channel(args))
    return rpc.call(
        lambda: stub.GetMetrics(
            system_pb2.GetMetricsRequest(), metadata=rpc.metadata(args), timeout=args.timeout
        )
    )


def print_results(results: list[GateResult], as_json: bool, header: str) -> int:
    failed = [r for r in results if r.failed]
    if as_json:
        print(
            json.dumps(
                {"passed": not failed, "window": header, "gates": [asdict(r) for r in results]}, indent=2
            )
        )
        return 1 if failed else 0
    print(header)
    rows = [("GATE", "RESULT", "MEASURED", "THRESHOLD")] + [
        (r.gate, r.result.upper(), r.measured, r.threshold) for r in results
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for i, row in enumerate(rows):
        print("  ".join(v.ljust(w) for v, w in zip(row[:3], widths, strict=True)) + "  " + row[3])
        if i > 0 and results[i - 1].note:
            print(" " * (widths[0] + 2) + f"↳ {results[i - 1].note}")
    print(f"{'FAILED' if failed else 'PASSED'}: {len(results) - len(failed)} of {len(results)} gates pass")
    return 1 if failed else 0


def cmd_check(args: argparse.Namespace) -> int:
    try:
        window = parse_duration(args.window)
    except ValueError as e:
        print(f"error: --window: {e}", file=sys.stderr)
        return 2
    before = None
    if window > 0:
        before = get_metrics(args)
        if before is None:
            return 1
        time.sleep(window)
    after = get_metrics(args)
    if after is None:
        return 1
    results = evaluate(before, after, args.skip)
    if "canvas_persistence" not in args.skip:
        results.insert(-1, canvas_probe(args))
    header = f"gates over the last {args.window}" if window > 0 else "gates since each service started"
    return print_results(results, args.json, header)


def cmd_snapshot(args: argparse.Namespace) -> int:
    m = get_metrics(args)
    if m is None:
        return 1
    args.output.write_text(json_format.MessageToJson(m, indent=2) + "\n", encoding="utf-8")
    print(f"saved figures of {m.time.ToJsonString()} to {args.output}")
    if m.unavailable_services:
        print(f"warning: unavailable: {', '.join(m.unavailable_services)}", file=sys.stderr)
    return 0


def load_snapshot(path: Path) -> system_pb2.GetMetricsResponse:
    return json_format.Parse(path.read_text(encoding="utf-8"), system_pb2.GetMetricsResponse())


def _figures(m: system_pb2.GetMetricsResponse) -> dict[str, float]:
    f: dict[str, float] = {
        "runs.finals": m.runs.finals,
        "runs.cancel_to_ack.p95_ms": m.runs.cancel_to_ack.p95_ms,
        "runs.cancel_to_cancelled.p95_ms": m.runs.cancel_to_cancelled.p95_ms,
        "runs.duplicate_finals_suppressed": m.runs.duplicate_finals_suppressed,
        "runs.duplicate_finals_delivered": m.runs.duplicate_finals_delivered,
        "reactions.matches": m.reactions.matches,
        "reactions.false_positive_rate": m.reactions.false_positive_rate,
        "nodes.online": m.nodes.online,
        "nodes.registrations": m.nodes.registrations,
        "nodes.reconnect_success_rate": m.nodes.reconnect_success_rate,
        "voice.tts_requests": m.voice.tts_requests,
        "voice.tts_fallbacks": m.voice.tts_fallbacks,
    }
    for prefix, items in (
        ("runs.state", m.runs.run_states),
        ("runs.dropped", m.runs.dropped_messages),
        ("runs.replies", m.runs.replies_by_mode),
        ("reactions.skips", m.reactions.skips),
        ("nodes.canvas", m.nodes.canvas_operations),
    ):
        for n in items:
            f[f"{prefix}.{n.name}"] = n.value
    return f


def cmd_compare(args: argparse.Namespace) -> int:
    try:
        before, after = load_snapshot(args.before), load_snapshot(args.after)
    except (OSError, json_format.ParseError) as e:
        print(f"error: cannot read a snapshot: {e}", file=sys.stderr)
        return 2
    fb, fa = _figures(before), _figures(after)
    results = evaluate(before, after)
    if not args.json:
        print(f"before {before.time.ToJsonString()}  after {after.time.ToJsonString()}")
        names = sorted(set(fb) | set(fa))
        width = max(len(n) for n in names)
        print(f"{'FIGURE'.ljust(width)}  {'BEFORE':>12}  {'AFTER':>12}  {'CHANGE':>12}")
        for n in names:
            x, y = fb.get(n, 0.0), fa.get(n, 0.0)
            print(f"{n.ljust(width)}  {x:>12.4g}  {y:>12.4g}  {y - x:>+12.4g}")
        print()
    return print_results(results, args.json, "gates between the two snapshots")


Command = Callable[[argparse.Namespace], int]
