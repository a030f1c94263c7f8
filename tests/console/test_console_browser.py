"""The operator console in headless Chromium (Playwright) against a real mesh: every service and the
gateway as processes, the console process in front. Screenshots go to test-artifacts/console/."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from flynn.v1 import config_pb2, config_pb2_grpc, gateway_pb2, gateway_pb2_grpc, nodes_pb2, nodes_pb2_grpc
from google.protobuf import duration_pb2, field_mask_pb2

from flynn_runtime.audit import read_audit
from tests.console.conftest import OPERATOR_NAME, VOICE_CHANNEL, shot
from tests.support.console import ConsoleMesh, ConsoleProcess
from tests.support.mesh import ROOT

PNG_1X1 = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


@pytest.fixture(scope="module")
def gw(mesh: ConsoleMesh) -> Iterator[grpc.Channel]:
    ch = grpc.insecure_channel(mesh.gateway_addr)
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def signed_in(browser: Any, mesh: ConsoleMesh) -> Any:
    """The browser context, signed in once through the real sign-in page."""
    assert mesh.console is not None
    page = browser.new_page()
    page.goto(mesh.console.url + "/")
    assert page.url.endswith("/signin")
    page.fill("#token", mesh.tokens.operator)
    page.click("#signin-submit")
    page.wait_for_selector("#whoami:has-text('operator:alice')")
    shot(page, "00-signed-in")
    page.close()
    return browser


def send(gw: grpc.Channel, mesh: ConsoleMesh, session: str, text: str, channel: str = "web") -> str:
    stub = gateway_pb2_grpc.GatewayStub(gw)
    resp = stub.SendMessage(
        gateway_pb2.SendMessageRequest(
            channel=channel, session_key=session, sender="u1", text=text, idempotency_key=uuid.uuid4().hex
        ),
        metadata=mesh.tokens.md("channel"),
        timeout=10,
    )
    return str(resp.run_id)


def set_config(gw: grpc.Channel, mesh: ConsoleMesh, cfg: config_pb2.FlynnConfig, path: str) -> int:
    stub = config_pb2_grpc.ConfigServiceStub(gw)
    md = mesh.tokens.md("operator")
    head = stub.GetConfig(config_pb2.GetConfigRequest(), metadata=md, timeout=10).revision
    rev = stub.UpdateConfig(
        config_pb2.UpdateConfigRequest(
            config=cfg,
            update_mask=field_mask_pb2.FieldMask(paths=[path]),
            expected_revision=head,
            reason="test",
        ),
        metadata=md,
        timeout=10,
    ).revision
    wait_applied(gw, mesh, rev)
    return int(rev)


def watchers(gw: grpc.Channel, mesh: ConsoleMesh) -> config_pb2.ListWatchersResponse:
    return config_pb2_grpc.ConfigServiceStub(gw).ListWatchers(
        config_pb2.ListWatchersRequest(), metadata=mesh.tokens.md("operator"), timeout=10
    )


def wait_applied(gw: grpc.Channel, mesh: ConsoleMesh, rev: int) -> None:
    wait_for(
        f"every service to apply revision {rev}",
        lambda: all(w.applied_revision >= rev for w in watchers(gw, mesh).watchers if w.connected),
    )


def console_audit(mesh: ConsoleMesh) -> list[dict[str, Any]]:
    assert mesh.console is not None
    return read_audit(mesh.console.data_dir / "audit" / "console.jsonl")


# --- sign-in and refusal ---------------------------------------------------------------------------


def _post_form(url: str, data: dict[str, str], headers: dict[str, str]) -> tuple[int, dict[str, str], str]:
    body = urllib.parse.urlencode(data).encode()
    req = urllib.request.Request(url, data=body, headers=headers)
    opener = urllib.request.build_opener(_NoRedirect())
    try:
        with opener.open(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read(4096).decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read(4096).decode(errors="replace")


def test_sign_in_needs_its_csrf_token_and_names_the_credentials_owner(mesh: ConsoleMesh) -> None:
    assert mesh.console is not None
    url = mesh.console.url + "/signin"
    page = urllib.request.urlopen(url, timeout=10)  # noqa: S310 - the test's own console
    cookie = page.headers["Set-Cookie"].split(";")[0]
    found = re.search(r'name="csrf" value="([^"]+)"', page.read().decode())
    assert found is not None and cookie.endswith(found.group(1))
    csrf = found.group(1)
    token = mesh.tokens.operator
    # no token, a wrong one, the cookie's without the form's, and a cross-site post: all refused
    assert _post_form(url, {"token": token}, {})[0] == 403
    assert _post_form(url, {"token": token, "csrf": "forged"}, {"Cookie": cookie})[0] == 403
    assert _post_form(url, {"token": token, "csrf": csrf}, {})[0] == 403
    cross = {"Cookie": cookie, "Origin": "https://evil.example"}
    assert _post_form(url, {"token": token, "csrf": csrf}, cross)[0] == 403
    # a name typed into the form counts for nothing: the actor is the credential's principal, and an
    # X-Forwarded-For from a peer that is not a trusted proxy is not believed
    status, headers, _ = _post_form(
        url,
        {"token": token, "csrf": csrf, "operator": "mallory"},
        {"Cookie": cookie, "X-Forwarded-For": "203.0.113.9"},
    )
    assert status == 303
    session = headers["Set-Cookie"].split(";")[0]
    _, _, me = _get(mesh.console.url + "/api/me", cookie=session)
    assert json.loads(me)["actor"] == f"operator:{OPERATOR_NAME}"
    signed = [e for e in console_audit(mesh) if e["event"] == "consoleSignIn"]
    assert signed[-1]["actor"] == f"operator:{OPERATOR_NAME}" and signed[-1]["peer"] == "127.0.0.1"


def _get(url: str, cookie: str | None = None) -> tuple[int, str, str]:
    req = urllib.request.Request(url, headers={"Cookie": cookie} if cookie else {})
    opener = urllib.request.build_opener(_NoRedirect())
    try:
        with opener.open(req, timeout=10) as r:
            return r.status, r.headers.get("Location", ""), r.read(4096).decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Location", ""), e.read(4096).decode(errors="replace")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


DATA_ENDPOINTS = [
    "/api/me", "/api/sessions", "/api/runs", "/api/config", "/api/config/history", "/api/config/watchers",
    "/api/rollout", "/api/reactions/stats", "/api/reactions/traces", "/api/nodes", "/api/canvas",
    "/api/canvas/artifact?name=x", "/api/canvas/raw?name=x", "/api/audit", "/api/status",
    "/api/stream/runs", "/api/stream/replies", "/api/stream/node-events", "/api/stream/poll/config",
    "/api/stream/poll/audit",
]  # fmt: skip


def test_wrong_or_missing_token_gets_the_sign_in_page_and_no_data(browser: Any, mesh: ConsoleMesh) -> None:
    assert mesh.console is not None
    url = mesh.console.url
    # No session: the page redirects to sign-in and every data endpoint refuses, streams included.
    status, location, _ = _get(url + "/")
    assert status == 303 and location.endswith("/signin")
    for path in DATA_ENDPOINTS:
        status, _, body = _get(url + path)
        assert status == 401, (path, status, body)
        assert json.loads(body) == {
            "error": {"code": "UNAUTHENTICATED", "message": "sign in first", "violations": []}
        }
    status, _, _ = _get(url + "/api/config", cookie="flynn_console=forged-session-id")
    assert status == 401

    page = browser.new_page()
    try:
        for token in ("not-a-token", mesh.tokens.channel):  # unknown token; a real token of another role
            page.goto(url + "/signin")
            page.fill("#token", token)
            page.click("#signin-submit")
            page.wait_for_selector("#signin-error")
            assert page.url.endswith("/signin")
            assert "not accepted" in page.inner_text("#signin-error")
            assert page.query_selector("nav") is None  # no console, no data
            assert not [c for c in page.context.cookies() if c["name"] == "flynn_console"]
        shot(page, "01-signin-refused")
    finally:
        page.close()
    refused = [e for e in console_audit(mesh) if e["event"] == "consoleSignInFailed"]
    # a refused sign-in names nobody: the name comes from an accepted credential only
    assert len(refused) >= 2 and all(e["actor"] == "anonymous" for e in refused)
    assert all(mesh.tokens.channel not in json.dumps(e) for e in console_audit(mesh))  # never the token


def test_session_cookie_is_httponly_strict_and_posts_need_the_csrf_header(
    signed_in: Any, mesh: ConsoleMesh
) -> None:
    cookies = [c for c in signed_in.cookies() if c["name"] == "flynn_console"]
    assert len(cookies) == 1
    c = cookies[0]
    assert c["httpOnly"] and c["sameSite"] == "Strict"
    assert mesh.tokens.operator not in c["value"]
    page = signed_in.new_page()
    try:
        page.goto(mesh.console_url + "/#/runs")
        page.wait_for_selector("#sessions-box")
        assert page.evaluate("document.cookie") == ""  # not readable by scripts
        status = page.evaluate(
            """async () => (await fetch('/api/cancel', {method: 'POST', headers: {'Content-Type': 'application/json'},
               body: JSON.stringify({run_id: 'r', scope: 'run'})})).status"""
        )
        assert status == 403
    finally:
        page.close()


# --- runs ------------------------------------------------------------------------------------------


def test_a_run_appears_streams_and_completes_live(
    signed_in: Any, mesh: ConsoleMesh, gw: grpc.Channel
) -> None:
    page = signed_in.new_page()
    try:
        page.goto(mesh.console_url + "/#/runs")
        page.wait_for_selector("#run-feed")
        time.sleep(0.5)  # the event stream is open
        session = f"web:live-{uuid.uuid4().hex[:8]}"
        run_id = send(gw, mesh, session, "hello console")
        feed = "#run-feed li[data-run-id='%s'][data-type='%s']"
        page.wait_for_selector(feed % (run_id, "RUN_STARTED"))
        page.wait_for_selector(feed % (run_id, "RUN_OUTPUT"))  # streamed chunks
        page.wait_for_selector(feed % (run_id, "RUN_COMPLETED"))
        # The session table shows it without a reload (the view is live).
        page.wait_for_selector(f"#sessions-table tr[data-session='{session}']")
        row = page.inner_text(f"#sessions-table tr[data-session='{session}']")
        assert "collect (global" in row.lower()
        shot(page, "02-runs")
        page.click(f"#run-feed li[data-run-id='{run_id}'][data-type='RUN_COMPLETED'] a")
        page.wait_for_selector("#run-state:has-text('completed')")
        timeline = page.inner_text("#run-timeline")
        for step in ("run_started", "run_output", "run_completed"):
            assert step in timeline
        assert page.inner_text("#run-output").strip()
        shot(page, "03-run-timeline")
    finally:
        page.close()


def test_cancel_a_run_from_the_page(signed_in: Any, mesh: ConsoleMesh, gw: grpc.Channel) -> None:
    slow = config_pb2.FlynnConfig()
    slow.server.agent.think_time.CopyFrom(duration_pb2.Duration(seconds=60))
    set_config(gw, mesh, slow, "server.agent.think_time")
    page = signed_in.new_page()
    try:
        session = f"web:cancel-{uuid.uuid4().hex[:8]}"
        run_id = send(gw, mesh, session, "think long")
        page.goto(mesh.console_url + f"/#/runs/{run_id}")
        page.wait_for_selector("#run-state:has-text('started')")
        page.click("#run-cancel")
        page.wait_for_selector("#run-state:has-text('cancelled')", timeout=30_000)
        page.wait_for_selector(f"#run-feed li[data-run-id='{run_id}'][data-type='RUN_CANCELLED']")
        shot(page, "04-run-cancelled")

        # A session with a run and one queued message: the table shows the depth; one button ends both.
        busy = f"web:busy-{uuid.uuid4().hex[:8]}"
        busy_run = send(gw, mesh, busy, "first")
        send(gw, mesh, busy, "second, queued behind it")
        row = f"#sessions-table tr[data-session='{busy}']"
        page.wait_for_selector(row + ":has-text('started')")
        assert page.inner_text(row).split("\t")[4] == "1"  # queue depth
        page.click(row + " button:has-text('Cancel session + queue')")
        page.wait_for_selector("#status:has-text('1 queued dropped')")
        page.wait_for_selector(f"#run-feed li[data-run-id='{busy_run}'][data-type='RUN_CANCELLED']")
        page.wait_for_selector(row + ":has-text('none')")  # no active run, nothing queued
        assert page.inner_text(row).split("\t")[4] == "0"
    finally:
        page.close()
        fast = config_pb2.FlynnConfig()
        fast.server.agent.think_time.CopyFrom(duration_pb2.Duration(nanos=200_000_000))
        set_config(gw, mesh, fast, "server.agent.think_time")
    entry = [e for e in console_audit(mesh) if e["event"] == "consoleCancelRun" and e.get("run_id") == run_id]
    assert entry and entry[-1]["actor"] == f"operator:{OPERATOR_NAME}" and entry[-1]["outcome"] == "ok"
    queue_audit = read_audit(mesh.procs["queue"].data_dir / "audit" / "queue.jsonl")
    assert any(run_id in json.dumps(e) and "operator" in str(e.get("actor", "")) for e in queue_audit)


# --- gates -----------------------------------------------------------------------------------------


def test_flip_a_gate_see_every_service_apply_it_and_roll_back(
    signed_in: Any, mesh: ConsoleMesh, gw: grpc.Channel
) -> None:
    page = signed_in.new_page()
    page.on("dialog", lambda d: d.accept("undo the flip"))
    try:
        page.goto(mesh.console_url + "/#/gates")
        page.wait_for_selector("#config-revision")
        before = int(page.inner_text("#config-revision"))
        page.fill("#gate-key", "server.queue.mode")
        page.fill("#gate-value", "followup")
        page.click("#gate-preview")
        page.wait_for_selector("#diff-table")
        diff = page.inner_text("#diff-table")
        assert "server.queue.mode" in diff and "followup" in diff
        assert int(page.inner_text("#config-revision")) == before  # a preview commits nothing
        page.click("#gate-apply")  # no reason: refused in the page
        page.wait_for_selector("#gate-diff .error")
        page.fill("#gate-reason", "canary followup")
        page.click("#gate-apply")
        page.wait_for_selector("#gate-applied")
        flipped = int(page.inner_text("#gate-applied").split()[-1].rstrip("."))
        assert flipped == before + 1
        services = {w.identity.service for w in watchers(gw, mesh).watchers}
        assert {"queue", "reactions", "nodes", "voice"} <= services
        # Every service's row shows the new revision and none is flagged stale (live, no reload).
        for svc in services:
            page.wait_for_selector(f"#watchers-table tr[data-service='{svc}'][data-applied='{flipped}']")
        assert "stale" not in page.inner_text("#watchers-table").replace("Stale =", "")
        page.wait_for_selector(
            "#gates-overview tr[data-key='server.queue.mode'] .gate-value:has-text('FOLLOWUP')"
        )
        shot(page, "05-gates-flipped")

        page.click(f"#history-table button[data-rollback='{before}']")
        page.wait_for_selector(f"#config-revision:has-text('{flipped + 1}')")
        page.wait_for_selector(
            "#gates-overview tr[data-key='server.queue.mode'] .gate-value:has-text('COLLECT')"
        )
        for svc in services:
            page.wait_for_selector(f"#watchers-table tr[data-service='{svc}'][data-applied='{flipped + 1}']")
        page.wait_for_selector(f"#history-table tr[data-revision='{flipped + 1}']:has-text('rollback')")
        shot(page, "06-gates-rolled-back")
    finally:
        page.close()
    entries = console_audit(mesh)
    upd = [e for e in entries if e["event"] == "consoleUpdateConfig" and e["outcome"] == "ok"]
    rb = [e for e in entries if e["event"] == "consoleRollbackConfig" and e["outcome"] == "ok"]
    assert upd[-1]["actor"] == rb[-1]["actor"] == f"operator:{OPERATOR_NAME}"
    assert upd[-1]["key"] == "server.queue.mode" and rb[-1]["to_revision"] == before
    config_audit = read_audit(mesh.procs["config"].data_dir / "audit" / "config.jsonl")
    revs = {e.get("revision"): e for e in config_audit}
    assert (
        revs[flipped]["actor"].startswith("operator:")
        and "console, operator:alice" in revs[flipped]["reason"]
    )
    assert revs[flipped + 1]["actor"].startswith("operator:")


# --- canvas ----------------------------------------------------------------------------------------


def test_nodes_and_canvas_artifacts(signed_in: Any, mesh: ConsoleMesh, gw: grpc.Channel) -> None:
    node_id = f"laptop-{uuid.uuid4().hex[:6]}"
    issued = nodes_pb2_grpc.NodesStub(gw).IssueNodeToken(
        nodes_pb2.IssueNodeTokenRequest(node_id=node_id, role="desktop"),
        metadata=mesh.tokens.md("operator"),
        timeout=10,
    )
    page = signed_in.new_page()
    node = subprocess.Popen(
        [sys.executable, "-m", "examples.companion_node", "--addr", mesh.gateway_addr, "--node-id", node_id,
         "--token", issued.token, "--role", "desktop", "--log-level", "warning"],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'gen'}"),
    )  # fmt: skip
    try:
        page.goto(mesh.console_url + "/#/nodes")
        page.wait_for_selector("#nodes-table")
        # The companion node connects through the gateway: it shows up live, with role and epoch.
        row = f"#nodes-table tr[data-node='{node_id}']"
        page.wait_for_selector(row + ":has-text('online')")
        cells = page.inner_text(row).split("\t")
        assert cells[1] == "desktop" and cells[4] == "1", cells
        page.wait_for_selector(f"#node-feed li:has-text('{node_id}')")
        name = f"plans/{uuid.uuid4().hex[:6]}.json"
        page.fill("#canvas-name", name)
        page.set_input_files(
            "#canvas-file",
            files=[
                {"name": "plan.json", "mimeType": "application/json", "buffer": b'{"steps":["a","b"],"n":2}'}
            ],
        )
        page.click("#canvas-submit")
        page.wait_for_selector(f"#canvas-table tr[data-name='{name}']")
        page.wait_for_selector("#artifact-text")
        assert json.loads(page.inner_text("#artifact-text")) == {"steps": ["a", "b"], "n": 2}
        assert '\n  "steps"' in page.inner_text("#artifact-text")  # pretty-printed
        # A second version, then the first one from the version picker.
        page.set_input_files(
            "#canvas-file",
            files=[{"name": "plan.json", "mimeType": "application/json", "buffer": b'{"n":3}'}],
        )
        page.click("#canvas-submit")
        page.wait_for_selector("#artifact-version option[value='2']", state="attached")
        page.select_option("#artifact-version", "1")
        page.wait_for_selector("#artifact-text:has-text('steps')")

        img = f"shots/{uuid.uuid4().hex[:6]}.png"
        page.fill("#canvas-name", img)
        page.set_input_files(
            "#canvas-file", files=[{"name": "dot.png", "mimeType": "image/png", "buffer": PNG_1X1}]
        )
        page.click("#canvas-submit")
        page.wait_for_selector("#artifact-image")
        page.wait_for_function("document.querySelector('#artifact-image').naturalWidth === 1")
        shot(page, "07-nodes-canvas")
        page.once("dialog", lambda d: d.accept())
        page.click(f"#canvas-table tr[data-name='{img}'] button:has-text('Delete')")
        page.wait_for_selector(f"#canvas-table tr[data-name='{img}']", state="detached")
    finally:
        page.close()
        node.terminate()
        node.wait(10)
    puts = [e for e in console_audit(mesh) if e["event"] == "consoleCanvasPut" and e["outcome"] == "ok"]
    assert {e["name"] for e in puts} >= {name, img}
    deletes = [e for e in console_audit(mesh) if e["event"] == "consoleCanvasDelete"]
    assert deletes[-1]["name"] == img and deletes[-1]["outcome"] == "ok"
    assert all(e["actor"] == f"operator:{OPERATOR_NAME}" for e in puts)


# --- voice -----------------------------------------------------------------------------------------


def test_tts_fallback_is_counted_after_breaking_the_voice_engine(
    signed_in: Any, mesh: ConsoleMesh, gw: grpc.Channel
) -> None:
    page = signed_in.new_page()
    try:
        page.goto(mesh.console_url + "/#/voice")
        page.wait_for_selector("#voice-fallbacks")
        send(gw, mesh, f"{VOICE_CHANNEL}:ok-{uuid.uuid4().hex[:6]}", "say this aloud", channel=VOICE_CHANNEL)
        page.wait_for_selector("#voice-replies li[data-delivery='audio'] audio", timeout=30_000)
        src = page.get_attribute("#voice-replies li[data-delivery='audio'] audio", "src")
        assert src
        kind = page.evaluate(f"async () => (await fetch({json.dumps(src)})).headers.get('content-type')")
        assert kind == "audio/wav"
        duration = page.evaluate(
            f"""() => new Promise((ok, bad) => {{ const a = new Audio({json.dumps(src)});
                a.onloadedmetadata = () => ok(a.duration); a.onerror = () => bad('cannot decode'); }})"""
        )
        assert duration > 0.2  # the page's player can decode and play the reply's audio
        before = int(page.inner_text("#voice-fallbacks"))

        mesh.restart_voice("--fail-engines", "espeak-ng")  # break the engine (fault injection switch)
        send(
            gw,
            mesh,
            f"{VOICE_CHANNEL}:broken-{uuid.uuid4().hex[:6]}",
            "this falls back",
            channel=VOICE_CHANNEL,
        )
        wait_for("a fallback counted", lambda: int(page.inner_text("#voice-fallbacks")) > before, timeout=40)
        page.wait_for_selector("#voice-replies li[data-delivery='text_after_fallback']")
        shot(page, "08-voice")
    finally:
        page.close()
        mesh.restart_voice()


# --- reactions -------------------------------------------------------------------------------------


def test_reactions_stats_why_not_and_false_positive_flag(
    signed_in: Any, mesh: ConsoleMesh, gw: grpc.Channel
) -> None:
    page = signed_in.new_page()
    page.on("dialog", lambda d: d.accept("not a real ping"))
    try:
        send(gw, mesh, f"web:react-{uuid.uuid4().hex[:6]}", "ping the team")
        quiet = f"web:quiet-{uuid.uuid4().hex[:6]}"
        send(gw, mesh, quiet, "nothing to see here")
        page.goto(mesh.console_url + "/#/reactions")
        stats = "#rule-stats tr[data-rule='ping-ack']"
        page.wait_for_selector(stats)
        wait_for("the match counted", lambda: page.inner_text(stats).split("\t")[1].strip() not in ("", "0"))
        # Why didn't ping-ack fire for the quiet message? Its trace says: scope.
        page.fill("#trace-rule", "ping-ack")
        page.select_option("#trace-matched", "false")
        page.click("#traces-form button[type=submit]")
        page.wait_for_selector("#traces-table tbody tr:has-text('skipped: scope')")
        page.select_option("#trace-matched", "true")
        page.click("#traces-form button[type=submit]")
        page.wait_for_selector("#traces-table button[data-flag]")
        page.click("#traces-table button[data-flag] >> nth=0")
        page.wait_for_selector("#traces-table tbody tr:has-text('false positive')")
        # One match, flagged: the rule's false-positive rate is 100 % (and shown red, above 3 %).
        wait_for("the FP rate shown", lambda: page.inner_text(stats).split("\t")[-1].strip() == "100.00 %")
        shot(page, "10-reactions")
    finally:
        page.close()
    flags = [e for e in console_audit(mesh) if e["event"] == "consoleFlagFalsePositive"]
    assert flags and flags[-1]["outcome"] == "ok" and flags[-1]["actor"] == f"operator:{OPERATOR_NAME}"


# --- rollout, audit ---------------------------------------------------------------------


def test_rollout_reactions_and_audit_views(signed_in: Any, mesh: ConsoleMesh) -> None:
    page = signed_in.new_page()
    try:
        page.goto(mesh.console_url + "/#/rollout")
        page.wait_for_selector("#gates-table, #rollout-unavailable")
        if page.query_selector("#gates-table"):
            page.click("#snap-before")
            page.wait_for_selector("#snapshot-compare")
            rows = page.inner_text("#gates-table")
            for gate in ("Metrics readable", "Cancel-to-ack p95", "Duplicate finals", "false-positive", "reconnect",
                         "TTS fallback", "Error rate"):  # fmt: skip
                assert gate in rows
            # A match flagged by the reactions test (1 of few) never passes the ≤ 3 % gate: it fails, or
            # is inconclusive while the matches are below the gate's minimum sample; nothing else fails.
            events = {e["event"] for e in console_audit(mesh)}
            if "consoleFlagFalsePositive" in events:
                row = "#gates-table tr[data-gate='reaction_false_positives']"
                page.wait_for_selector(f"{row} td.fail, {row} td.inconclusive")
            for gate in ("metrics_available", "cancel_to_ack_p95", "duplicate_finals", "node_reconnect_success",
                         "tts_no_dropped_replies", "error_rate"):  # fmt: skip
                assert "fail" not in page.inner_text(f"#gates-table tr[data-gate='{gate}']"), gate
            if "consoleCancelRun" in events:
                # One cancel is below the gate's minimum sample (20): inconclusive, never a pass.
                cell = "#gates-table tr[data-gate='cancel_to_ack_p95'] td:nth-child(4)"
                assert page.get_attribute(cell, "class") == "inconclusive"
                assert "needed" in page.inner_text(cell)
            page.wait_for_selector("#snapshot-window tr[data-gate='duplicate_finals']")
            page.click("#snap-after")
            page.wait_for_selector("#snapshot-window caption:has-text('to “after”')")
            page.wait_for_selector("#gates-table svg.trend polyline", state="attached")
        shot(page, "09-rollout")

        page.goto(mesh.console_url + "/#/audit")
        page.wait_for_selector("#audit-table")
        page.fill("#audit-actor", f"operator:{OPERATOR_NAME}")
        page.fill("#audit-event", "consoleSignIn")
        page.press("#audit-event", "Enter")
        wait_for(
            "the filtered tail",
            lambda: (
                "consoleSignIn" in (t := page.inner_text("#audit-table"))
                and "canvasPut" not in t
                and "mallory" not in t
            ),
        )
        assert all(
            f"operator:{OPERATOR_NAME}" in row
            for row in page.locator("#audit-table tbody tr").all_inner_texts()
        )
        page.fill("#audit-event", "")
        page.fill("#audit-actor", "")
        page.select_option("#audit-service", "config")
        page.press("#audit-event", "Enter")
        wait_for(
            "the config service's entries only",
            lambda: (
                "configSeed" in (t := page.inner_text("#audit-table tbody")) and "console" not in t.split()
            ),
        )
        shot(page, "11-audit")

        # Keyboard: the nav is reachable and its links are real links.
        page.goto(mesh.console_url + "/#/runs")
        page.reload()
        page.wait_for_selector("#sessions-box")
        focused = []
        for _ in range(3):
            page.keyboard.press("Tab")
            focused.append(page.evaluate("document.activeElement.id || document.activeElement.textContent"))
        assert focused == ["Skip to content", "nav-runs", "nav-gates"]
        outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
        assert outline == "solid"  # visible focus
        page.keyboard.press("Enter")
        page.wait_for_selector("#main[data-view='gates'] #gate-form")
    finally:
        page.close()


def test_replicas_view_lists_each_stateful_service_as_its_one_process(
    signed_in: Any, mesh: ConsoleMesh
) -> None:
    """The Replicas view (SQLite here: each stateful service is one process): one ready row per
    service with the address it listens on and what it holds, values rendered as text."""
    page = signed_in.new_page()
    try:
        page.goto(mesh.console.url + "/#/replicas")  # type: ignore[union-attr]
        for name in ("config", "queue", "reactions", "nodes"):
            row = page.wait_for_selector(f"#replicas-{name} tbody tr[data-state='ready']")
            assert row is not None
            text = row.inner_text()
            assert mesh.procs[name].address in text and "held" in text, text
            assert page.locator(f"#replicas-{name} tbody tr").count() == 1
        assert "watch streams" in page.inner_text("#replicas-config")
        assert page.locator("#replicas-box script, #replicas-box img").count() == 0
        shot(page, "13-replicas")
    finally:
        page.close()


def test_sign_out_ends_the_session(signed_in: Any, mesh: ConsoleMesh) -> None:
    page = signed_in.new_page()
    try:
        page.goto(mesh.console_url + "/#/runs")
        page.wait_for_selector("#whoami:has-text('operator:')")
        old = [c["value"] for c in signed_in.cookies() if c["name"] == "flynn_console"][0]
        page.click("#signout-form button")
        page.wait_for_url("**/signin")
        status, _, _ = _get(mesh.console_url + "/api/config", cookie=f"flynn_console={old}")
        assert status == 401
    finally:
        page.close()


def test_rollout_says_not_available_when_get_metrics_is_unimplemented(
    browser: Any, mesh: ConsoleMesh
) -> None:
    """A console in front of a server without flynn.v1.System (the config service itself answers
    UNIMPLEMENTED for System.GetMetrics, as a gateway before issue 8 did) shows "Not available yet"."""
    other = ConsoleProcess(mesh.root / "console-no-metrics", mesh.procs["config"].address).start()
    page = browser.new_page()
    try:
        page.goto(other.url + "/signin")
        page.fill("#token", mesh.tokens.operator)
        page.click("#signin-submit")
        page.wait_for_selector("#whoami:has-text('operator:')")
        page.goto(other.url + "/#/rollout")
        page.wait_for_selector("#rollout-unavailable:has-text('Not available yet')")
        page.goto(other.url + "/#/voice")
        page.wait_for_selector("#voice-metrics-unavailable")
        shot(page, "12-rollout-not-available")
    finally:
        page.close()
        other.stop()


def test_console_stops_promptly_on_sigterm_with_streams_open(browser: Any, mesh: ConsoleMesh) -> None:
    """Last in this module: SIGTERM ends open event streams and the process exits 0 within its grace."""
    assert mesh.console is not None
    page = browser.new_page()
    try:
        page.goto(mesh.console.url + "/signin")
        page.fill("#token", mesh.tokens.operator)
        page.click("#signin-submit")
        page.goto(mesh.console.url + "/#/nodes")  # three live streams open
        page.wait_for_selector("#nodes-table")
        t0 = time.monotonic()
        assert mesh.console.stop() == 0
        assert time.monotonic() - t0 < 10
        assert "Traceback" not in mesh.console.log_tail(200)
    finally:
        page.close()
