"""A real Prometheus scrapes a running `flynn-dev up` mesh under a small bounded load, evaluates the
gates' recording rules (generated from the same definitions as the chart's, with a 20 s window),
and agrees with `flynn gates check --window 20s` on the same window; every dashboard query runs.

Prometheus runs from the Debian package (scripts/bootstrap.sh) in a temp dir on a free port on
127.0.0.1, scraping every service's metrics port each second. The load (messages, cancels, a flagged
reaction match, caller mistakes, a companion node going away and coming back) sits in the middle of the command's window, a warm-up before it
creates every series, so both windows hold the same events; the figures then agree up to Prometheus'
extrapolation of increase() to the window's edges, which is at most one scrape interval per edge.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from flynn.v1 import (
    gateway_pb2,
    gateway_pb2_grpc,
    nodes_pb2,
    nodes_pb2_grpc,
    reactions_pb2,
    reactions_pb2_grpc,
)

from examples.companion_node import CompanionNode
from flynn_runtime.gates.dashboard import queries
from flynn_runtime.histograms import CANCEL_BUCKETS
from tests.gateway.test_launcher import Launcher, launched
from tests.support.mesh import ROOT, free_port

SCRAPE_S = 1.0
WINDOW = "20s"
WINDOW_S = 20.0
# Small minimum samples, for a small load (the rules are generated with the same ones).
MIN_SAMPLES = (
    "cancel_to_ack_p95=3", "reaction_false_positives=5", "error_rate=5", "duplicate_finals=1", "node_reconnect_success=2",
)  # fmt: skip
STATUS_NAMES = {0: "pass", 1: "fail", 2: "inconclusive"}
RECORDS = {
    "cancel_to_ack_p95": "flynn:gate_cancel_to_ack_sample:count",
    "duplicate_finals": "flynn:gate_finals_sample:count",
    "reaction_false_positives": "flynn:gate_reaction_matches_sample:count",
    "tts_no_dropped_replies": "flynn:gate_finals_sample:count",
    "error_rate": "flynn:gate_runs_finished_sample:count",
    "node_reconnect_success": "flynn:gate_node_reconnect_sample:count",
}


def _seed(path: Path) -> Path:
    cfg = yaml.safe_load((ROOT / "config" / "flynn.yaml").read_text())
    cfg["server"]["queue"]["mode"] = "followup"
    cfg["server"]["agent"].update({"think_time": "1500ms", "chunks": 2, "chunk_interval": "20ms"})
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return path


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    tmp = tmp_path_factory.mktemp("live")
    with launched(tmp / "data", ["--seed-file", str(_seed(tmp / "seed.yaml"))]) as lch:
        lch.wait_for("Stop: Ctrl-C", timeout=180)
        yield lch


class Prometheus:
    def __init__(self, tmp: Path, targets: dict[str, str], rules: Path) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus missing: scripts/bootstrap.sh installs the Debian package prometheus")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": f"{SCRAPE_S:g}s", "evaluation_interval": f"{SCRAPE_S:g}s",
                       "scrape_timeout": "900ms"},
            "rule_files": [str(rules)],
            "scrape_configs": [
                {"job_name": f"flynn-{name}", "static_configs": [{"targets": [addr]}]} for name, addr in targets.items()
            ],
        }  # fmt: skip
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = (tmp / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def get(self, path: str, **params: str) -> dict[str, Any]:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(url, timeout=10) as resp:
                doc: dict[str, Any] = json.loads(resp.read())
        except urllib.error.HTTPError as e:
            doc = json.loads(e.read())
        return doc

    def query(self, expr: str, at: float | None = None) -> dict[str, Any]:
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        return self.get("/api/v1/query", **params)

    def value(self, expr: str, at: float) -> float | None:
        result = self.query(expr, at)["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def wait_ready(self, services: int) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "prometheus exited; see prometheus.log"
            try:
                up = self.query("sum(up)")
                if (
                    up.get("status") == "success"
                    and up["data"]["result"]
                    and float(up["data"]["result"][0]["value"][1]) == services
                ):
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError("prometheus never scraped every service")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def prometheus(mesh: Launcher, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    tmp = tmp_path_factory.mktemp("prometheus")
    rules = tmp / "rules.yaml"
    gen = [
        sys.executable,
        "scripts/gen_observability.py",
        "--rules",
        str(rules),
        "--window",
        WINDOW,
        "--for",
        "0s",
    ]
    gen += [arg for m in MIN_SAMPLES for arg in ("--min-sample", m)]
    subprocess.run(gen, cwd=ROOT, check=True, timeout=60)
    targets = {n: f"127.0.0.1:{s['metrics_port']}" for n, s in mesh.state().items() if s.get("metrics_port")}
    prom = Prometheus(tmp, targets, rules)
    try:
        prom.wait_ready(len(targets))
        yield prom
    finally:
        prom.stop()


def _token(mesh: Launcher, role: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", "Bearer " + (mesh.data_dir / "secrets" / f"{role}.token").read_text().strip()),)


def _load(mesh: Launcher, tag: str, cancels: int, completes: int, flags: int, mistakes: int) -> None:
    """Bounded load through the gateway: runs cancelled while they think, runs completed, reaction
    matches flagged as false positives, calls refused as the caller's mistake."""
    with grpc.insecure_channel(f"127.0.0.1:{mesh.base_port}") as ch:
        gw = gateway_pb2_grpc.GatewayStub(ch)
        chan, op = _token(mesh, "channel"), _token(mesh, "operator")

        def send(session: str) -> str:
            req = gateway_pb2.SendMessageRequest(channel="cli", session_key=session, sender="me", text="hello",
                                                 idempotency_key=f"{session}-{time.time_ns()}")  # fmt: skip
            return str(gw.SendMessage(req, metadata=chan, timeout=10).run_id)

        for i in range(cancels):
            run_id = send(f"cli:{tag}-cancel-{i}")
            gw.CancelRun(
                gateway_pb2.GatewayCancelRunRequest(run_id=run_id, reason="live test"),
                metadata=chan,
                timeout=10,
            )
        for i in range(completes):
            send(f"cli:{tag}-done-{i}")
        for _ in range(mistakes):
            with pytest.raises(grpc.RpcError) as err:
                gw.SendMessage(
                    gateway_pb2.SendMessageRequest(channel="cli", text="x"), metadata=chan, timeout=10
                )
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        reactions = reactions_pb2_grpc.ReactionsStub(ch)
        traces = reactions.ListTraces(
            reactions_pb2.ListTracesRequest(rule_id="ack-received", matched=True, page_size=50),
            metadata=op,
            timeout=10,
        ).traces
        fresh = [t for t in traces if tag in t.session_key and not t.false_positive]
        assert len(fresh) >= flags, [t.session_key for t in traces]
        for t in fresh[:flags]:
            reactions.FlagFalsePositive(reactions_pb2.FlagFalsePositiveRequest(match_id=t.trace_id, reason="test"),
                                        metadata=op, timeout=10)  # fmt: skip


def _reconnect(mesh: Launcher, node_id: str, times: int) -> None:
    """A companion node registers, goes away and comes back `times` times (each return is a reconnect)."""

    async def run() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{mesh.base_port}") as ch:
            token = nodes_pb2_grpc.NodesStub(ch).IssueNodeToken(
                nodes_pb2.IssueNodeTokenRequest(node_id=node_id, role="desktop"), metadata=_token(mesh, "operator"),
                timeout=10,
            ).token  # fmt: skip
        for _ in range(times + 1):
            node = CompanionNode(
                f"127.0.0.1:{mesh.base_port}", node_id, token, "desktop", backoff_initial=0.05
            )
            task = node.start()
            await asyncio.wait_for(node.registered.wait(), 20)
            await node.stop()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(task, 10)

    asyncio.run(run())


def _flynn(mesh: Launcher, *args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, FLYNN_ADDR=f"127.0.0.1:{mesh.base_port}", PYTHONPATH=f"{ROOT}:{ROOT / 'gen'}",
               FLYNN_TOKEN=(mesh.data_dir / "secrets" / "operator.token").read_text().strip())  # fmt: skip
    return subprocess.Popen([sys.executable, "-m", "flynn_cli.main", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)  # fmt: skip


def _get_metrics_calls(mesh: Launcher) -> float:
    """System/GetMetrics calls the gateway has answered (its own metrics page)."""
    port = mesh.state()["gateway"]["metrics_port"]
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        page = resp.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in page.splitlines()
        if line.startswith("grpc_server_handled_total{") and 'grpc_method="GetMetrics"' in line
    )


def _wait_first_sample(mesh: Launcher, before: float) -> None:
    """Until the command's first GetMetrics answer went out: its window has begun."""
    deadline = time.monotonic() + 60
    while _get_metrics_calls(mesh) <= before:
        assert time.monotonic() < deadline, "flynn gates check never took its first sample"
        time.sleep(0.05)


def _bucket(ms: float) -> tuple[float, float]:
    bounds = [0.0, *(b * 1000 for b in CANCEL_BUCKETS)]
    return next((lo, hi) for lo, hi in zip(bounds, bounds[1:], strict=False) if ms <= hi)


def _wait_quiet(prom: Prometheus) -> None:
    """Until no run is active (the warm-up's runs ended) and two scrapes have seen it."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if prom.value("sum(flynn_runs_active)", time.time()) == 0:
            time.sleep(2 * SCRAPE_S)
            return
        time.sleep(0.2)
    raise AssertionError("runs still active")


def test_recording_rules_agree_with_flynn_gates_check(mesh: Launcher, prometheus: Prometheus) -> None:
    _load(mesh, "warm", cancels=1, completes=1, flags=1, mistakes=1)  # every series exists from here on
    _reconnect(mesh, "warm-desk", 1)
    _wait_quiet(prometheus)
    time.sleep(3 * SCRAPE_S)
    calls = _get_metrics_calls(mesh)
    check = _flynn(mesh, "gates", "check", "--window", WINDOW, "--json", "--skip", "canvas_persistence",
                   *[a for m in MIN_SAMPLES for a in ("--min-sample", m)])  # fmt: skip
    _wait_first_sample(mesh, calls)
    time.sleep(2 * SCRAPE_S)  # the load sits well inside both windows
    _load(mesh, "live", cancels=4, completes=4, flags=1, mistakes=3)
    _reconnect(mesh, "live-desk", 3)
    out, err = check.communicate(timeout=120)
    done = time.time()
    assert check.returncode == 1, out + err  # the flagged match breaks reaction_false_positives
    cli = {g["gate"]: g for g in json.loads(out)["gates"]}
    time.sleep(2 * SCRAPE_S)  # the rules have been evaluated at `done`
    tolerance = 2.2 * SCRAPE_S / WINDOW_S  # increase() extrapolates up to one scrape interval per edge

    for gate, g in cli.items():
        if gate == "metrics_available":
            continue
        status = prometheus.value(f'flynn:gate_status{{gate="{gate}"}}', done)
        assert status is not None and STATUS_NAMES[int(status)] == g["result"], (gate, status, g)
        if gate in RECORDS:
            sample = prometheus.value(RECORDS[gate], done)
            assert sample is not None and abs(sample - g["sample"]) <= g["sample"] * tolerance + 0.01, (
                gate,
                sample,
                g,
            )

    assert cli["cancel_to_ack_p95"]["result"] == "pass" and cli["cancel_to_ack_p95"]["sample"] == 4
    p95_ms = float(cli["cancel_to_ack_p95"]["measured"].removesuffix(" ms"))
    prom_p95 = prometheus.value("flynn:gate_cancel_to_ack_p95:seconds", done)
    # Both interpolate inside the same bucket; increase() extrapolates each bucket's series on its own
    # (a bucket that was at zero is not extrapolated past its start), so the point within it may move.
    assert prom_p95 is not None and _bucket(prom_p95 * 1000) == _bucket(p95_ms), (prom_p95, p95_ms)

    fp = cli["reaction_false_positives"]
    assert fp["result"] == "fail" and fp["sample"] == 8 and fp["measured"] == "12.50%", fp
    prom_fp = prometheus.value("flynn:gate_reaction_false_positive_rate:ratio", done)
    assert prom_fp is not None and abs(prom_fp - 0.125) < 0.005, prom_fp

    er = cli["error_rate"]
    # Caller mistakes (and companion streams the caller closed: CANCELLED) are shown, not judged.
    assert er["result"] == "pass" and er["sample"] == 8 and "caller_error/INVALID_ARGUMENT=3" in er["note"], (
        er
    )
    assert prometheus.value("flynn:gate_run_error_rate:ratio", done) == 0.0
    rec = cli["node_reconnect_success"]
    assert rec["result"] == "pass" and rec["sample"] == 3 and rec["measured"] == "100.00%", rec
    assert prometheus.value("flynn:gate_node_reconnect_success:ratio", done) == 1.0


def test_every_dashboard_query_runs(prometheus: Prometheus) -> None:
    doc = json.loads((ROOT / "charts" / "flynn" / "files" / "grafana-dashboard.json").read_text())
    exprs = queries(doc)
    assert len(exprs) >= 15
    for expr in exprs:
        # As Grafana does: $__rate_interval becomes a duration of at least four scrape intervals.
        q = expr.replace("$__rate_interval", "1m")
        doc = prometheus.query(q)
        assert doc.get("status") == "success", (expr, doc)
    statuses = prometheus.query("flynn:gate_status")["data"]["result"]
    assert {s["metric"]["gate"] for s in statuses} >= {"cancel_to_ack_p95", "error_rate"}
    assert prometheus.query("sum by (mode) (rate(flynn_messages_by_mode_total[1m]))")["data"]["result"]
