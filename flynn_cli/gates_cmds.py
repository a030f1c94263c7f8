"""`flynn gates ...`: the rollout playbook's gates, evaluated from live figures (System.GetMetrics).

    flynn gates check [--window 60s] [--json] [--skip GATE] [--min-sample GATE=N] [--baseline before.json]
    flynn gates snapshot -o before.json
    flynn gates compare before.json after.json [--json]

The gates themselves (thresholds, minimum samples, one function per gate) are flynn_runtime.gates,
which the console and the Prometheus rules use too; this module reads the figures, runs the canvas
probe (it writes through the Canvas service) and prints.

Exit codes (check and compare):
  0  every gate passed (skipped gates aside)
  1  a gate failed, or the figures could not be read
  2  bad arguments, or a snapshot file that cannot be read
  3  inconclusive: nothing failed, but a gate had less than its minimum sample in the window
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc
from flynn.v1 import canvas_pb2, canvas_pb2_grpc, system_pb2, system_pb2_grpc
from google.protobuf import json_format

from flynn_cli import rpc
from flynn_runtime.gates import (
    EXIT_FAIL,
    EXIT_USAGE,
    GATE_NAMES,
    MIN_SAMPLE,
    GateResult,
    Limits,
    Verdict,
    evaluate,
    exit_code,
)
from flynn_runtime.gates.window import rates
from flynn_runtime.histograms import format_ms

PROBE_NAME = "gates/persistence-probe"
EXIT_CODES = "exit codes: 0 all gates pass, 1 a gate failed (or no figures), 2 bad arguments, 3 inconclusive"


def register(sub: Any) -> None:
    p = sub.add_parser("gates", help="rollout gates: check, snapshot, compare (docs/operations/ROLLOUT.md)")
    cmds = p.add_subparsers(dest="command", metavar="<command>")
    cmds.required = True

    c = cmds.add_parser("check", help="evaluate every gate over a window of live figures", epilog=EXIT_CODES)
    c.add_argument(
        "--window", default="60s", help="time between the two samples, e.g. 30s, 2m, 0 (default 60s)"
    )
    c.add_argument("--json", action="store_true", help="print the results as JSON")
    c.add_argument(
        "--skip", action="append", default=[], choices=GATE_NAMES, help="do not evaluate this gate"
    )
    c.add_argument("--probe-name", default=PROBE_NAME, help=f"canvas probe artifact (default {PROBE_NAME})")
    c.add_argument(
        "--baseline",
        type=Path,
        help="a `flynn gates snapshot` taken before the change: the error_rate gate's baseline "
        "(default: the figures at the start of the window)",
    )
    _limit_args(c)
    c.set_defaults(func=cmd_check)

    c = cmds.add_parser("snapshot", help="save the current figures (System.GetMetrics) to a JSON file")
    c.add_argument("-o", "--output", type=Path, required=True)
    c.set_defaults(func=cmd_snapshot)

    c = cmds.add_parser(
        "compare", help="before/after of two snapshots, and the gates between them", epilog=EXIT_CODES
    )
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    c.add_argument("--json", action="store_true")
    _limit_args(c)
    c.set_defaults(func=cmd_compare)


def _limit_args(c: argparse.ArgumentParser) -> None:
    defaults = ", ".join(f"{k}={v}" for k, v in MIN_SAMPLE.items())
    c.add_argument(
        "--min-sample",
        action="append",
        default=[],
        metavar="GATE=N",
        help=f"observations a gate needs, below which it is inconclusive (defaults: {defaults})",
    )
    c.add_argument(
        "--error-rate-margin",
        type=float,
        default=Limits().error_rate_margin,
        help="how far (0..1) the window's error rates may exceed the baseline's (default %(default)s)",
    )


def limits_from(args: argparse.Namespace) -> Limits:
    """The Limits the arguments ask for; raises ValueError naming a bad --min-sample."""
    overrides: dict[str, int] = {}
    for item in args.min_sample:
        gate, sep, n = item.partition("=")
        if not sep or gate not in MIN_SAMPLE or not n.isdigit():
            raise ValueError(
                f"--min-sample {item!r}: expected GATE=N with GATE one of {', '.join(MIN_SAMPLE)}"
            )
        overrides[gate] = int(n)
    if not 0.0 <= args.error_rate_margin <= 1.0:
        raise ValueError(f"--error-rate-margin must be between 0 and 1, got {args.error_rate_margin}")
    return Limits(error_rate_margin=args.error_rate_margin).with_min_samples(overrides)


_DURATION = re.compile(r"^(?P<n>\d+(?:\.\d+)?)(?P<unit>ms|s|m|h)?$")


def parse_duration(text: str) -> float:
    m = _DURATION.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a duration (e.g. 30s, 2m, 500ms, 0)")
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}[m["unit"]]
    return float(m["n"]) * scale


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
                "canvas_persistence", Verdict.FAIL, f"previous probe v{prev.version}: {why}", threshold
            )
        notes.append(f"previous probe v{prev.version} intact ({prev.sha256[:12]}…)")
        etag = prev.etag
    except grpc.RpcError as e:
        code = e.code() if isinstance(e, grpc.Call) else None
        if code == grpc.StatusCode.FAILED_PRECONDITION and "CANVAS_DISABLED" in _reason(e):
            return GateResult(
                "canvas_persistence",
                Verdict.SKIP,
                "canvas is off",
                threshold,
                "server.nodes.feature_gates.ui.canvas is false",
            )
        if code != grpc.StatusCode.NOT_FOUND:
            return GateResult(
                "canvas_persistence", Verdict.FAIL, f"cannot read the probe: {_describe(e)}", threshold
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
        return GateResult(
            "canvas_persistence", Verdict.FAIL, f"probe write/read failed: {_describe(e)}", threshold
        )
    expected = hashlib.sha256(content).hexdigest()
    if got.content != content or got.sha256 != expected:
        return GateResult(
            "canvas_persistence", Verdict.FAIL, f"probe v{put.version} read back different", threshold
        )
    notes.append(f"new probe v{put.version} written and read back ({expected[:12]}…)")
    return GateResult("canvas_persistence", Verdict.PASS, "intact", threshold, "; ".join(notes))


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


_SUMMARY = {0: "PASSED", 1: "FAILED", 3: "INCONCLUSIVE"}


def print_results(results: list[GateResult], as_json: bool, header: str) -> int:
    """Print the gates (a table or JSON) and return the exit code they call for."""
    code = exit_code(results)
    counts = {v: sum(1 for r in results if r.result == v) for v in Verdict}
    if as_json:
        doc = {
            "passed": code == 0,
            "verdict": _SUMMARY[code].lower(),
            "exit_code": code,
            "window": header,
            "gates": [asdict(r) for r in results],
        }
        print(json.dumps(doc, indent=2))
        return code
    print(header)
    rows = [("GATE", "RESULT", "MEASURED", "THRESHOLD")] + [
        (r.gate, r.result.upper(), r.measured, r.threshold) for r in results
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for i, row in enumerate(rows):
        print("  ".join(v.ljust(w) for v, w in zip(row[:3], widths, strict=True)) + "  " + row[3])
        if i > 0 and results[i - 1].note:
            print(" " * (widths[0] + 2) + f"↳ {results[i - 1].note}")
    print(
        f"{_SUMMARY[code]}: {counts[Verdict.PASS]} of {len(results)} gates pass, "
        f"{counts[Verdict.FAIL]} fail, {counts[Verdict.INCONCLUSIVE]} inconclusive, {counts[Verdict.SKIP]} skipped"
    )
    return code


def _window_and_limits(args: argparse.Namespace) -> tuple[float, Limits] | None:
    try:
        return parse_duration(args.window), limits_from(args)
    except ValueError as e:
        print(f"error: {e}" if str(e).startswith("--") else f"error: --window: {e}", file=sys.stderr)
        return None


def cmd_check(args: argparse.Namespace) -> int:
    parsed = _window_and_limits(args)
    if parsed is None:
        return EXIT_USAGE
    window, limits = parsed
    baseline = None
    if args.baseline is not None:
        try:
            baseline = load_snapshot(args.baseline)
        except (OSError, json_format.ParseError) as e:
            print(f"error: cannot read the baseline snapshot: {e}", file=sys.stderr)
            return EXIT_USAGE
    before = None
    if window > 0:
        before = get_metrics(args)
        if before is None:
            return EXIT_FAIL
        time.sleep(window)
    after = get_metrics(args)
    if after is None:
        return EXIT_FAIL
    results = evaluate(before, after, args.skip, limits, baseline)
    if "canvas_persistence" not in args.skip:
        results.append(canvas_probe(args))
        results.sort(key=lambda r: GATE_NAMES.index(r.gate))
    header = f"gates over the last {args.window}" if window > 0 else "gates since each service started"
    return print_results(results, args.json, header)


def error_summary(m: system_pb2.GetMetricsResponse) -> str:
    """The error rates of one answer (since each process started), for people."""
    r = rates(m)
    runs = f"{r.run_error_rate:.2%}" if r.run_error_rate is not None else "-"
    server = f"{r.server_error_rate:.2%}" if r.server_error_rate is not None else "-"
    calls = {n.name: n.value for n in m.gateway.calls_by_class}
    return (
        f"error rate: runs {runs} ({r.runs_errored:.0f} of {r.runs_finished:.0f} finished in error); "
        f"gateway server errors {server} ({r.server_errors:.0f} of {r.calls:.0f} calls; "
        f"{calls.get('caller_error', 0.0):.0f} caller errors)"
    )


def cmd_snapshot(args: argparse.Namespace) -> int:
    m = get_metrics(args)
    if m is None:
        return EXIT_FAIL
    args.output.write_text(json_format.MessageToJson(m, indent=2) + "\n", encoding="utf-8")
    print(f"saved figures of {m.time.ToJsonString()} to {args.output}")
    print(error_summary(m))
    if m.unavailable_services:
        print(f"warning: unavailable: {', '.join(m.unavailable_services)}", file=sys.stderr)
    return 0


def load_snapshot(path: Path) -> system_pb2.GetMetricsResponse:
    return json_format.Parse(path.read_text(encoding="utf-8"), system_pb2.GetMetricsResponse())


def _figures(m: system_pb2.GetMetricsResponse) -> dict[str, float]:
    r = rates(m)
    f: dict[str, float] = {
        "runs.finals": m.runs.finals,
        "runs.finished": m.runs.runs_finished,
        "runs.errored": m.runs.runs_errored,
        "runs.error_rate": r.run_error_rate or 0.0,
        "runs.cancel_to_ack.p95_ms": m.runs.cancel_to_ack.p95_ms,
        "runs.cancel_to_cancelled.p95_ms": m.runs.cancel_to_cancelled.p95_ms,
        "runs.cancel_to_cancelled.p99_ms": m.runs.cancel_to_cancelled.p99_ms,
        "runs.duplicate_finals_suppressed": m.runs.duplicate_finals_suppressed,
        "runs.duplicate_finals_delivered": m.runs.duplicate_finals_delivered,
        "reactions.matches": m.reactions.matches,
        "reactions.false_positive_rate": m.reactions.false_positive_rate,
        "nodes.online": m.nodes.online,
        "nodes.registrations": m.nodes.registrations,
        "nodes.reconnect_success_rate": m.nodes.reconnect_success_rate,
        "voice.tts_requests": m.voice.tts_requests,
        "voice.tts_fallbacks": m.voice.tts_fallbacks,
        "gateway.server_error_rate": r.server_error_rate or 0.0,
    }
    for prefix, items in (
        ("runs.state", m.runs.run_states),
        ("runs.dropped", m.runs.dropped_messages),
        ("runs.replies", m.runs.replies_by_mode),
        ("reactions.skips", m.reactions.skips),
        ("nodes.canvas", m.nodes.canvas_operations),
        ("gateway.calls", m.gateway.calls_by_class),
        ("gateway.failures", m.gateway.failures_by_code),
    ):
        for n in items:
            f[f"{prefix}.{n.name}"] = n.value
    return f


def _tops(m: system_pb2.GetMetricsResponse) -> dict[str, float]:
    """The top finite bucket of each percentile figure, to show a value above it as "> top"."""
    return {
        "runs.cancel_to_ack.p95_ms": m.runs.cancel_to_ack.top_bound_ms,
        "runs.cancel_to_cancelled.p95_ms": m.runs.cancel_to_cancelled.top_bound_ms,
        "runs.cancel_to_cancelled.p99_ms": m.runs.cancel_to_cancelled.top_bound_ms,
    }


def _cell(value: float, top: float) -> str:
    return format_ms(value, top).removesuffix(" ms") if math.isinf(value) else f"{value:.4g}"


def cmd_compare(args: argparse.Namespace) -> int:
    try:
        before, after = load_snapshot(args.before), load_snapshot(args.after)
        limits = limits_from(args)
    except (OSError, json_format.ParseError) as e:
        print(f"error: cannot read a snapshot: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    fb, fa = _figures(before), _figures(after)
    tb, ta = _tops(before), _tops(after)
    results = evaluate(before, after, (), limits)
    if not args.json:
        print(f"before {before.time.ToJsonString()}  after {after.time.ToJsonString()}")
        print(f"before {error_summary(before)}")
        print(f"after  {error_summary(after)}")
        names = sorted(set(fb) | set(fa))
        width = max(len(n) for n in names)
        print(f"{'FIGURE'.ljust(width)}  {'BEFORE':>12}  {'AFTER':>12}  {'CHANGE':>12}")
        for n in names:
            x, y = fb.get(n, 0.0), fa.get(n, 0.0)
            change = f"{y - x:>+12.4g}" if math.isfinite(x) and math.isfinite(y) else f"{'-':>12}"
            print(
                f"{n.ljust(width)}  {_cell(x, tb.get(n, 0.0)):>12}  {_cell(y, ta.get(n, 0.0)):>12}  {change}"
            )
        print()
    return print_results(results, args.json, "gates between the two snapshots")


Command = Callable[[argparse.Namespace], int]
