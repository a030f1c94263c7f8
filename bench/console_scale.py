"""The operator console at 1,000 sessions and 1,000 connected nodes: API latency and page responsiveness.

    .venv/bin/python -m bench.console_scale [--sessions 1000] [--nodes 1000]

1. starts the whole mesh (every service + gateway as processes) and the console (tests/support/console.py),
2. submits one message in each of N sessions through Gateway.SendMessage (so N sessions and N runs),
3. issues N node tokens through the gateway and connects N companion nodes (bench.nodes_soak's fleet),
4. times the console's JSON endpoints (sessions page, nodes page, runs page, paging through every node),
   and the run-event stream's catch-up over the whole history,
5. in headless Chromium: time until the Runs and Nodes views show their first page, the longest
   main-thread stall while each view stays open with its live streams (a 50 ms interval timer's worst
   lateness), and the page's DOM size.
Every phase is bounded; nothing is asserted (figures only).
"""

from __future__ import annotations

import argparse
import asyncio
import http.cookiejar
import json
import shutil
import statistics
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import grpc
from flynn.v1 import gateway_pb2, gateway_pb2_grpc, nodes_pb2, nodes_pb2_grpc

SEED = """
server:
  queue:
    mode: collect
    quiet_window: 20ms
  agent:
    think_time: 10ms
    chunks: 1
  nodes:
    enabled: true
    allowed_roles: [desktop, phone]
    feature_gates:
      ui:
        canvas: true
"""

STALL_JS = """() => new Promise((done) => {
  let worst = 0, last = performance.now();
  const t = setInterval(() => { const now = performance.now(); worst = Math.max(worst, now - last - 50); last = now; }, 50);
  setTimeout(() => { clearInterval(t); done(worst); }, 5000);
})"""


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def fmt(values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return f"p50 {statistics.median(ms):.1f} ms, p95 {pct(ms, 95):.1f} ms, max {max(ms):.1f} ms (n={len(ms)})"


async def submit_sessions(gateway: str, token: str, n: int) -> float:
    md = (("authorization", f"Bearer {token}"),)
    sem = asyncio.Semaphore(32)
    async with grpc.aio.insecure_channel(gateway) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)

        async def one(i: int) -> None:
            async with sem:
                await stub.SendMessage(
                    gateway_pb2.SendMessageRequest(
                        channel="web",
                        session_key=f"web:scale-{i:05d}",
                        sender="u",
                        text=f"hello {i}",
                        idempotency_key=uuid.uuid4().hex,
                    ),
                    metadata=md,
                    timeout=30,
                )

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return time.perf_counter() - t0


async def issue_node_tokens(gateway: str, token: str, n: int) -> list[tuple[str, str]]:
    md = (("authorization", f"Bearer {token}"),)
    sem = asyncio.Semaphore(32)
    async with grpc.aio.insecure_channel(gateway) as ch:
        stub = nodes_pb2_grpc.NodesStub(ch)

        async def one(i: int) -> tuple[str, str]:
            async with sem:
                r = await stub.IssueNodeToken(
                    nodes_pb2.IssueNodeTokenRequest(node_id=f"scale-{i:04d}", role="desktop"),
                    metadata=md,
                    timeout=30,
                )
                return r.node_id, r.token

        return list(await asyncio.gather(*(one(i) for i in range(n))))


class Http:
    def __init__(self, base: str) -> None:
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def sign_in(self, token: str) -> None:
        data = urllib.parse.urlencode({"operator": "bench", "token": token}).encode()
        with self.opener.open(self.base + "/signin", data=data, timeout=30) as r:
            assert r.status == 200

    def get(self, path: str) -> tuple[float, Any]:
        t0 = time.perf_counter()
        with self.opener.open(self.base + path, timeout=60) as r:
            body = json.loads(r.read())
        return time.perf_counter() - t0, body

    def stream_catch_up(self, path: str, want_seq: int, within: float = 60) -> tuple[float, int, int]:
        """(seconds until the stream reached want_seq, batches, events sent)."""
        t0 = time.perf_counter()
        batches = sent = 0
        with self.opener.open(self.base + path, timeout=within) as r:
            while time.perf_counter() - t0 < within:
                line = r.readline().decode()
                if line.startswith("data: "):
                    data = json.loads(line[6:])
                    batches += 1
                    sent += len(data["items"])
                    if data["items"] and int(data["items"][-1]["global_seq"]) >= want_seq:
                        break
        return time.perf_counter() - t0, batches, sent


def browser_figures(url: str, token: str, figures: dict[str, str]) -> None:
    from playwright.sync_api import sync_playwright

    from tests.support.console import CHROMIUM, CHROMIUM_ARGS

    user_data = tempfile.mkdtemp(prefix="console-scale-")
    try:
        with sync_playwright() as p:
            ctx = p.chromium.launch_persistent_context(
                user_data, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
            )
            ctx.set_default_timeout(60_000)
            page = ctx.new_page()
            page.goto(url + "/signin")
            page.fill("#operator", "bench")
            page.fill("#token", token)
            page.click("#signin-submit")
            page.wait_for_selector("#whoami:has-text('operator:bench')")
            for view, ready in (("runs", "#sessions-table tbody tr"), ("nodes", "#nodes-table tbody tr")):
                page.goto(url + "/#/audit")
                page.wait_for_selector("#audit-table")
                t0 = time.perf_counter()
                page.goto(url + f"/#/{view}")
                page.wait_for_selector(ready)
                first = time.perf_counter() - t0
                stall = float(page.evaluate(STALL_JS))
                rows = page.locator(ready).count()
                dom = int(page.evaluate("document.getElementsByTagName('*').length"))
                figures[f"browser {view} view"] = (
                    f"first page ({rows} rows) in {first * 1000:.0f} ms; worst main-thread stall over 5 s "
                    f"with live streams {stall:.0f} ms; {dom} DOM elements"
                )
            ctx.close()
    finally:
        shutil.rmtree(user_data, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=1000)
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--no-browser", action="store_true")
    ns = p.parse_args()

    from bench.nodes_soak import _spawn_fleet, read_status
    from tests.support.console import ConsoleMesh
    from tests.support.mesh import make_tokens

    work = Path(tempfile.mkdtemp(prefix="console-scale-"))
    mesh = ConsoleMesh(work, make_tokens(work), SEED)
    fleet = None
    figures: dict[str, str] = {}
    try:
        t0 = time.perf_counter()
        mesh.start()
        assert mesh.console is not None
        print(f"mesh + console up in {time.perf_counter() - t0:.1f} s", flush=True)
        took = asyncio.run(submit_sessions(mesh.gateway_addr, mesh.tokens.channel, ns.sessions))
        figures["setup sessions"] = f"{ns.sessions} sessions submitted in {took:.1f} s"
        creds = asyncio.run(issue_node_tokens(mesh.gateway_addr, mesh.tokens.operator, ns.nodes))
        tokens_json = work / "node-tokens.json"
        tokens_json.write_text(json.dumps(creds))
        status = work / "fleet-status.json"
        t0 = time.perf_counter()
        fleet = _spawn_fleet(mesh.procs["nodes"].address, tokens_json, status, 50)
        end = time.monotonic() + 120
        while time.monotonic() < end:
            st = read_status(status)
            if st.get("registered", 0) >= ns.nodes or st.get("stopped", 0) >= ns.nodes:
                break
            time.sleep(0.2)
        reg = read_status(status).get("registered", 0)
        figures["setup nodes"] = f"{reg}/{ns.nodes} nodes connected in {time.perf_counter() - t0:.1f} s"
        print(figures["setup sessions"], "|", figures["setup nodes"], flush=True)

        web = Http(mesh.console.url)
        web.sign_in(mesh.tokens.operator)
        figures["GET /api/sessions (25 a page)"] = fmt([web.get("/api/sessions")[0] for _ in range(20)])
        figures["GET /api/nodes (50 a page)"] = fmt([web.get("/api/nodes")[0] for _ in range(20)])
        figures["GET /api/runs (50 a page)"] = fmt([web.get("/api/runs")[0] for _ in range(20)])
        t0 = time.perf_counter()
        pages, seen, token = 0, 0, ""
        while pages < 100:
            _, body = web.get("/api/nodes?page_size=50&page_token=" + urllib.parse.quote(token))
            pages += 1
            seen += len(body["nodes"])
            token = body["next_page_token"]
            if not token:
                break
        figures["page through every node"] = (
            f"{seen} nodes in {pages} pages, {time.perf_counter() - t0:.2f} s"
        )
        _, last = web.get("/api/runs?page_size=1")
        _, run = web.get("/api/runs/" + last["runs"][0]["run_id"])
        head = max(int(e["global_seq"]) for e in run["timeline"]) if run["timeline"] else 1
        took, batches, sent = web.stream_catch_up("/api/stream/runs", head)
        figures["run-event stream catch-up"] = (
            f"whole history (to seq {head}) in {took:.2f} s: {batches} batches, {sent} events sent to the page"
        )
        if not ns.no_browser:
            browser_figures(mesh.console.url, mesh.tokens.operator, figures)
    finally:
        if fleet is not None:
            Path(str(status) + ".stop").write_text("")
            try:
                fleet.wait(30)
            except Exception:
                fleet.kill()
        mesh.stop()
        shutil.rmtree(work, ignore_errors=True)
    print()
    for k, v in figures.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
