"""The console's HTTP surface (aiohttp): sign-in, static assets, JSON endpoints and server-sent events.

Every /api endpoint needs a valid console session (cookie); every POST also needs the session's CSRF
header. All data comes from the gateway with the signed-in operator's token (mesh_client).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import html
import json
import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web
from flynn.v1 import nodes_pb2, run_control_pb2, system_pb2
from google.protobuf import json_format

from console import audit_tail, rollout_gates
from console.mesh_client import MeshClient, MeshError, node_event_dict, read_stream, run_event_dict
from console.reply_tally import ReplyTally
from console.sign_in import COOKIE, ConsoleSession, MemorySessions, SessionStore, SignInLimiter
from flynn_runtime.audit import AuditLog
from flynn_runtime.auth import IPNetwork, client_from_forwarded
from flynn_runtime.enum_names import short_name
from flynn_runtime.gates import evaluate as evaluate_gates

log = logging.getLogger("console")

STATIC = Path(__file__).parent / "static"
CSRF_HEADER = "X-Flynn-CSRF"
MAX_UPLOAD_BYTES = 8 * 1024 * 1024
FEED_KEEP = 200  # events per SSE batch the browser is sent (it keeps a bounded list too)
FLUSH_SECONDS = 0.25
CATCH_UP_SECONDS = 2.0
POLL_SECONDS = 1.0
HEARTBEAT_SECONDS = 15.0
AUDIO_CACHE = 32
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; "
    "style-src 'self'; script-src 'self'; object-src 'none'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_SCOPES = {
    "run": run_control_pb2.CANCEL_SCOPE_RUN,
    "session": run_control_pb2.CANCEL_SCOPE_SESSION,
    "session_and_queue": run_control_pb2.CANCEL_SCOPE_SESSION_AND_QUEUE,
}
_RUN_STATES = {
    "": 0,
    "queued": run_control_pb2.RUN_STATE_QUEUED,
    "started": run_control_pb2.RUN_STATE_STARTED,
    "cancel_requested": run_control_pb2.RUN_STATE_CANCEL_REQUESTED,
    "cancelled": run_control_pb2.RUN_STATE_CANCELLED,
    "completed": run_control_pb2.RUN_STATE_COMPLETED,
    "error": run_control_pb2.RUN_STATE_ERROR,
}
_AUDIO_MIME = {1: "audio/wav", 2: "audio/ogg", 3: "audio/mpeg"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class ConsoleState:
    mesh: MeshClient
    audit: AuditLog
    audit_dirs: list[Path]
    sessions: SessionStore = field(default_factory=MemorySessions)
    sign_in_limiter: SignInLimiter = field(default_factory=SignInLimiter)
    trend: rollout_gates.TrendWindow = field(default_factory=rollout_gates.TrendWindow)
    # label -> (time taken, GetMetrics answer, its gate rows)
    snapshots: dict[str, tuple[str, system_pb2.GetMetricsResponse, list[dict[str, Any]]]] = field(
        default_factory=dict
    )
    audio: OrderedDict[str, tuple[str, bytes]] = field(default_factory=OrderedDict)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    secure_cookie: bool = False
    # Proxies whose X-Forwarded-For names the browser (sign-in limits and the audit log's peer).
    trusted_proxies: tuple[IPNetwork, ...] = ()


STATE: web.AppKey[ConsoleState] = web.AppKey("state", ConsoleState)
SESSION_KEY = "console_session"


def _state(request: web.Request) -> ConsoleState:
    return request.app[STATE]


def _session(request: web.Request) -> ConsoleSession:
    s: ConsoleSession = request[SESSION_KEY]
    return s


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(
        data, status=status, dumps=lambda d: json.dumps(d, default=str, ensure_ascii=False)
    )


def _error(
    code: str, message: str, status: int, violations: list[dict[str, str]] | None = None
) -> web.Response:
    return _json({"error": {"code": code, "message": message, "violations": violations or []}}, status)


# --- middlewares ---------------------------------------------------------------------------------


@web.middleware
async def security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    resp = await handler(request)
    if not resp.prepared:
        for k, v in SECURITY_HEADERS.items():
            resp.headers.setdefault(k, v)
    return resp


@web.middleware
async def require_session(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith("/api/"):
        return await handler(request)
    st = _state(request)
    s = await st.sessions.get(request.cookies.get(COOKIE))
    if s is None:
        return _error("UNAUTHENTICATED", "sign in first", 401)
    if request.method not in ("GET", "HEAD") and request.headers.get(CSRF_HEADER) != s.csrf:
        return _error("PERMISSION_DENIED", f"missing or wrong {CSRF_HEADER} header", 403)
    request[SESSION_KEY] = s
    try:
        return await handler(request)
    except MeshError as e:
        if e.code == "UNAUTHENTICATED":  # the token was revoked or rotated: the session is over
            await st.sessions.drop(s.session_id)
        return _error(e.code, e.message, e.http_status, e.violations)


# --- pages ---------------------------------------------------------------------------------------


SIGNIN_CSRF_COOKIE = "flynn_signin_csrf"


def _signin_page(csrf: str, error: str = "") -> str:
    template = (STATIC / "signin.html").read_text(encoding="utf-8")
    err = f'<p class="error" role="alert" id="signin-error">{html.escape(error)}</p>' if error else ""
    return template.replace("{{error}}", err).replace("{{csrf}}", html.escape(csrf, quote=True))


def _signin_response(request: web.Request, error: str = "", status: int = 200, **kw: Any) -> web.Response:
    """The sign-in page with a fresh CSRF token, in the form and in a SameSite=Strict cookie: the POST
    must carry both, equal (a page on another site can neither read the cookie nor set it)."""
    csrf = secrets.token_urlsafe(24)
    resp = web.Response(text=_signin_page(csrf, error), status=status, content_type="text/html", **kw)
    resp.set_cookie(
        SIGNIN_CSRF_COOKIE,
        csrf,
        httponly=True,
        samesite="Strict",
        secure=_state(request).secure_cookie,
        path="/signin",
        max_age=3600,
    )
    return resp


def client_address(request: web.Request) -> str:
    """The browser's address: the TCP peer, or X-Forwarded-For when the peer is a trusted proxy."""
    st = _state(request)
    return client_from_forwarded(
        request.remote or "?", request.headers.get("X-Forwarded-For", ""), st.trusted_proxies
    )


def _same_origin(request: web.Request) -> bool:
    """An explicit Origin must be this console's. Browsers send "null" (or nothing) under our
    Referrer-Policy: no-referrer, so the CSRF token pair is what protects the form; this refuses a
    post that announces another site."""
    origin = request.headers.get("Origin")
    if not origin or origin == "null":
        return True
    return origin.split("://", 1)[-1] == request.host


async def signin_get(request: web.Request) -> web.StreamResponse:
    if await _state(request).sessions.get(request.cookies.get(COOKIE)) is not None:
        raise web.HTTPSeeOther("/")
    return _signin_response(request)


async def signin_post(request: web.Request) -> web.StreamResponse:
    st = _state(request)
    form = await request.post()
    token = str(form.get("token", "")).strip()
    peer = client_address(request)
    sent = str(form.get("csrf", ""))
    expected = request.cookies.get(SIGNIN_CSRF_COOKIE, "")
    if not expected or not secrets.compare_digest(sent, expected) or not _same_origin(request):
        st.audit.record("consoleSignInFailed", actor="anonymous", reason="CSRF check failed", peer=peer)
        return _signin_response(request, "The sign-in form expired; please sign in again.", 403)
    if not token:
        return _signin_response(request, "Enter your operator token.", 401)
    wait = st.sign_in_limiter.retry_after(peer)
    if wait > 0:
        return _signin_response(
            request,
            f"Too many failed sign-ins; try again in {int(wait) + 1} s.",
            429,
            headers={"Retry-After": str(int(wait) + 1)},
        )
    problem, operator = await st.mesh.verify_operator(token, peer)
    fingerprint = hashlib.sha256(token.encode()).hexdigest()[:12]
    if problem is not None:
        if problem.code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
            st.sign_in_limiter.record_failure(peer)
        st.audit.record(
            "consoleSignInFailed",
            actor="anonymous",
            token_fingerprint=fingerprint,
            reason=f"{problem.code}: {problem.message}",
            peer=peer,
        )
        msg = (
            "That token was not accepted by the gateway."
            if problem.code in ("UNAUTHENTICATED", "PERMISSION_DENIED")
            else f"The gateway could not be asked ({problem.code}: {problem.message})."
        )
        return _signin_response(request, msg, 401)
    s = await st.sessions.create(token, operator)
    st.audit.record("consoleSignIn", actor=s.actor, token_fingerprint=fingerprint, peer=peer)
    resp = web.HTTPSeeOther("/")
    resp.set_cookie(COOKIE, s.session_id, httponly=True, samesite="Strict", secure=st.secure_cookie, path="/")
    resp.del_cookie(SIGNIN_CSRF_COOKIE, path="/signin")
    raise resp


async def signout(request: web.Request) -> web.StreamResponse:
    st = _state(request)
    s = await st.sessions.get(request.cookies.get(COOKIE))
    if s is not None:
        form = await request.post()
        if form.get("csrf") != s.csrf:
            return _error("PERMISSION_DENIED", "missing or wrong csrf field", 403)
        st.audit.record("consoleSignOut", actor=s.actor, token_fingerprint=s.token_fingerprint)
        await st.sessions.drop(s.session_id)
    resp = web.HTTPSeeOther("/signin")
    resp.del_cookie(COOKIE, path="/")
    raise resp


async def index(request: web.Request) -> web.StreamResponse:
    if await _state(request).sessions.get(request.cookies.get(COOKIE)) is None:
        raise web.HTTPSeeOther("/signin")
    return web.FileResponse(STATIC / "index.html", headers={"Content-Type": "text/html; charset=utf-8"})


# --- helpers -------------------------------------------------------------------------------------


def _int(request: web.Request, name: str, default: int = 0) -> int:
    try:
        return int(request.query.get(name, default))
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be an integer") from None


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        data = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise web.HTTPBadRequest(text="the body must be JSON") from None
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(text="the body must be a JSON object")
    return data


def _reason(body: dict[str, Any], s: ConsoleSession, what: str) -> str:
    given = str(body.get("reason", "")).strip()[:500]
    return f"{given or what} (console, {s.actor})"


async def _audited(
    request: web.Request, event: str, fields: dict[str, Any], action: Callable[[], Awaitable[dict[str, Any]]]
) -> web.Response:
    """Run a mutating action and write the console's own audit entry, whatever the outcome."""
    st, s = _state(request), _session(request)
    try:
        result = await action()
    except MeshError as e:
        st.audit.record(event, actor=s.actor, outcome="error", error=f"{e.code}: {e.message}", **fields)
        raise
    st.audit.record(event, actor=s.actor, outcome="ok", result=_summary(result), **fields)
    return _json(result)


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "diff" and not isinstance(v, list | dict)}


# --- api: identity, runs -------------------------------------------------------------------------


async def api_me(request: web.Request) -> web.StreamResponse:
    s = _session(request)
    return _json(
        {
            "operator": s.operator,
            "token_fingerprint": s.token_fingerprint,
            "actor": s.actor,
            "csrf": s.csrf,
            "gateway": _state(request).mesh.gateway_addr,
        }
    )


async def api_sessions(request: web.Request) -> web.StreamResponse:
    state = _RUN_STATES.get(request.query.get("state", ""), 0)
    data = await _state(request).mesh.sessions_page(
        _session(request).token, state, _int(request, "page_size", 25), request.query.get("page_token", "")
    )
    return _json(data)


async def api_runs(request: web.Request) -> web.StreamResponse:
    state = _RUN_STATES.get(request.query.get("state", ""), 0)
    data = await _state(request).mesh.list_runs(
        _session(request).token,
        session_key=request.query.get("session_key", ""),
        state=state,
        page_size=_int(request, "page_size", 50),
        page_token=request.query.get("page_token", ""),
    )
    return _json(data)


async def api_run(request: web.Request) -> web.StreamResponse:
    mesh, token = _state(request).mesh, _session(request).token
    run = await mesh.get_run(token, request.match_info["run_id"])
    timeline = await mesh.run_timeline(token, run["run_id"], run.get("session_key", ""))
    return _json({"run": run, "timeline": timeline})


async def api_cancel(request: web.Request) -> web.StreamResponse:
    body = await _body(request)
    s = _session(request)
    scope_name = str(body.get("scope", "run"))
    if scope_name not in _SCOPES:
        return _error(
            "INVALID_ARGUMENT",
            "scope must be run, session or session_and_queue",
            400,
            [{"field": "scope", "description": "one of run, session, session_and_queue"}],
        )
    run_id, session_key = str(body.get("run_id", "")), str(body.get("session_key", ""))
    reason = _reason(body, s, "cancelled from the console")
    return await _audited(
        request,
        "consoleCancelRun",
        {"run_id": run_id or None, "session": session_key or None, "scope": scope_name, "reason": reason},
        lambda: _state(request).mesh.cancel(
            s.token, run_id=run_id, session_key=session_key, scope=_SCOPES[scope_name], reason=reason
        ),
    )


# --- api: config -----------------------------------------------------------------------------------


async def api_config(request: web.Request) -> web.StreamResponse:
    return _json(await _state(request).mesh.get_config(_session(request).token))


def _yaml_value(body: dict[str, Any]) -> Any:
    raw = body.get("value", "")
    if not isinstance(raw, str):
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise MeshError(
            "INVALID_ARGUMENT",
            f"the value is not YAML: {e}",
            400,
            [{"field": "value", "description": "not YAML"}],
        ) from None


async def api_config_preview(request: web.Request) -> web.StreamResponse:
    body = await _body(request)
    s = _session(request)
    key = str(body.get("key", "")).strip()
    data = await _state(request).mesh.update_key(
        s.token,
        key=key,
        value=_yaml_value(body),
        reason=_reason(body, s, "preview"),
        expected_revision=int(body.get("expected_revision") or 0),
        dry_run=True,
    )
    return _json(data)


async def api_config_apply(request: web.Request) -> web.StreamResponse:
    body = await _body(request)
    s = _session(request)
    key = str(body.get("key", "")).strip()
    if not str(body.get("reason", "")).strip():
        return _error(
            "INVALID_ARGUMENT", "a reason is required", 400, [{"field": "reason", "description": "required"}]
        )
    value = _yaml_value(body)
    reason = _reason(body, s, "")
    expected = int(body.get("expected_revision") or 0)
    return await _audited(
        request,
        "consoleUpdateConfig",
        {
            "key": key,
            "value": json.dumps(value, default=str),
            "reason": reason,
            "expected_revision": expected,
        },
        lambda: _state(request).mesh.update_key(
            s.token, key=key, value=value, reason=reason, expected_revision=expected, dry_run=False
        ),
    )


async def api_config_history(request: web.Request) -> web.StreamResponse:
    return _json(
        await _state(request).mesh.list_revisions(
            _session(request).token, _int(request, "page_size", 20), request.query.get("page_token", "")
        )
    )


async def api_config_rollback(request: web.Request) -> web.StreamResponse:
    body = await _body(request)
    s = _session(request)
    to_rev = int(body.get("to_revision") or 0)
    dry = bool(body.get("dry_run", False))
    reason = _reason(body, s, f"roll back to revision {to_rev}")
    if dry:
        return _json(await _state(request).mesh.rollback(s.token, to_rev, reason, True))
    return await _audited(
        request,
        "consoleRollbackConfig",
        {"to_revision": to_rev, "reason": reason},
        lambda: _state(request).mesh.rollback(s.token, to_rev, reason),
    )


async def api_watchers(request: web.Request) -> web.StreamResponse:
    return _json(await _state(request).mesh.watchers(_session(request).token))


# --- api: rollout, reactions, nodes, canvas, audit -------------------------------------------------


def judge(
    before: system_pb2.GetMetricsResponse | None, after: system_pb2.GetMetricsResponse
) -> list[dict[str, Any]]:
    """The playbook gates exactly as `flynn gates` judges them (since start when before is None), from
    the shared gates library; below a gate's minimum sample the row is inconclusive."""
    return rollout_gates.gate_rows([asdict(r) for r in evaluate_gates(before, after)])


def metrics_dict(m: system_pb2.GetMetricsResponse) -> dict[str, Any]:
    return json_format.MessageToDict(
        m, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


async def rollout_data(st: ConsoleState, token: str, sample: bool) -> dict[str, Any]:
    snapshots = {k: {"taken": v[0], "gates": v[2]} for k, v in st.snapshots.items()}
    try:
        resp = await st.mesh.get_metrics(token)
    except MeshError as e:
        if e.code == "UNIMPLEMENTED":
            return {"available": False, "detail": e.message, "snapshots": snapshots}
        raise
    metrics = metrics_dict(resp)
    gates = judge(None, resp)
    if sample:
        st.trend.add(rollout_gates.trend_values(metrics))
    comparison: list[dict[str, Any]] = []
    window: list[dict[str, Any]] = []
    if "before" in st.snapshots:
        before = st.snapshots["before"]
        after = st.snapshots.get("after")
        comparison = rollout_gates.compare(before[2], after[2] if after else gates)
        # The gates over the window between the snapshots (or from "before" until now), as
        # `flynn gates compare before.json after.json` judges them.
        window = judge(before[1], after[1] if after else resp)
    return {
        "available": True,
        "gates": gates,
        "trend": st.trend.series(),
        "metrics": metrics,
        "snapshots": snapshots,
        "comparison": comparison,
        "window": window,
    }


async def api_rollout(request: web.Request) -> web.StreamResponse:
    return _json(await rollout_data(_state(request), _session(request).token, sample=True))


async def api_rollout_snapshot(request: web.Request) -> web.StreamResponse:
    body = await _body(request)
    label = str(body.get("label", ""))
    if label not in ("before", "after"):
        return _error(
            "INVALID_ARGUMENT",
            "label must be before or after",
            400,
            [{"field": "label", "description": "before or after"}],
        )
    st, s = _state(request), _session(request)

    async def take() -> dict[str, Any]:
        data = await rollout_data(st, s.token, sample=True)
        if not data["available"]:
            raise MeshError("UNIMPLEMENTED", data["detail"], 501, [])
        taken = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        resp = await st.mesh.get_metrics(s.token)
        st.snapshots[label] = (taken, resp, judge(None, resp))
        if label == "before":
            st.snapshots.pop("after", None)
        return {"label": label, "taken": taken}

    return await _audited(request, "consoleRolloutSnapshot", {"label": label}, take)


async def api_reactions(request: web.Request) -> web.StreamResponse:
    return _json(await _state(request).mesh.rule_stats(_session(request).token))


async def api_traces(request: web.Request) -> web.StreamResponse:
    q = request.query
    matched = {"true": True, "false": False}.get(q.get("matched", ""))
    return _json(
        await _state(request).mesh.traces(
            _session(request).token,
            rule_id=q.get("rule_id", ""),
            event_id=q.get("event_id", ""),
            matched=matched,
            page_size=_int(request, "page_size", 50),
            page_token=q.get("page_token", ""),
        )
    )


async def api_flag(request: web.Request) -> web.StreamResponse:
    body = await _body(request)
    s = _session(request)
    match_id = str(body.get("match_id", ""))
    reason = _reason(body, s, "flagged from the console")
    return await _audited(
        request,
        "consoleFlagFalsePositive",
        {"match_id": match_id, "reason": reason},
        lambda: _state(request).mesh.flag_false_positive(s.token, match_id, reason),
    )


async def api_nodes(request: web.Request) -> web.StreamResponse:
    status = {"online": nodes_pb2.NODE_STATUS_ONLINE, "offline": nodes_pb2.NODE_STATUS_OFFLINE}.get(
        request.query.get("status", ""), 0
    )
    return _json(
        await _state(request).mesh.list_nodes(
            _session(request).token,
            status,
            _int(request, "page_size", 50),
            request.query.get("page_token", ""),
        )
    )


async def api_canvas_list(request: web.Request) -> web.StreamResponse:
    return _json(
        await _state(request).mesh.list_artifacts(
            _session(request).token,
            request.query.get("prefix", ""),
            _int(request, "page_size", 50),
            request.query.get("page_token", ""),
        )
    )


async def api_canvas_get(request: web.Request) -> web.StreamResponse:
    return _json(
        await _state(request).mesh.artifact_view(
            _session(request).token, request.query.get("name", ""), _int(request, "version", 0)
        )
    )


async def api_canvas_raw(request: web.Request) -> web.StreamResponse:
    a = await _state(request).mesh.get_artifact(
        _session(request).token, request.query.get("name", ""), _int(request, "version", 0)
    )
    ct = a.content_type.split(";")[0].strip().lower()
    if not ct.startswith("image/"):
        ct = "application/octet-stream"
    return web.Response(
        body=a.content,
        content_type=ct,
        headers={
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; sandbox",
            "Content-Disposition": "inline",
        },
    )


async def api_canvas_put(request: web.Request) -> web.StreamResponse:
    body = await _body(request)
    s = _session(request)
    name, ct, etag = str(body.get("name", "")), str(body.get("content_type", "")), str(body.get("etag", ""))
    try:
        content = base64.b64decode(str(body.get("content_b64", "")), validate=True)
    except (binascii.Error, ValueError):
        return _error(
            "INVALID_ARGUMENT",
            "content_b64 is not base64",
            400,
            [{"field": "content_b64", "description": "not base64"}],
        )
    return await _audited(
        request,
        "consoleCanvasPut",
        {"name": name, "content_type": ct, "size_bytes": len(content), "etag": etag or None},
        lambda: _state(request).mesh.put_artifact(
            s.token, name=name, content_type=ct, content=content, etag=etag
        ),
    )


async def api_canvas_delete(request: web.Request) -> web.StreamResponse:
    body = await _body(request)
    s = _session(request)
    name, etag = str(body.get("name", "")), str(body.get("etag", ""))
    return await _audited(
        request,
        "consoleCanvasDelete",
        {"name": name, "etag": etag or None},
        lambda: _state(request).mesh.delete_artifact(s.token, name, etag),
    )


def audit_data(st: ConsoleState, q: Any) -> dict[str, Any]:
    flt = audit_tail.AuditFilter(
        service=q.get("service", ""), event=q.get("event", ""), actor=q.get("actor", ""), text=q.get("q", "")
    )
    try:
        limit = int(q.get("limit", 200))
    except ValueError:
        limit = 200
    return {
        "entries": audit_tail.tail(st.audit_dirs, flt, limit),
        "services": audit_tail.services(st.audit_dirs),
        "dirs": [str(d) for d in st.audit_dirs],
    }


async def api_audit(request: web.Request) -> web.StreamResponse:
    st = _state(request)
    return _json(await asyncio.to_thread(audit_data, st, request.query))


async def api_status(request: web.Request) -> web.StreamResponse:
    return _json(await _state(request).mesh.get_status(_session(request).token))


async def api_replicas(request: web.Request) -> web.StreamResponse:
    """The replicas of each stateful service (config, queue, reactions, nodes) as they know themselves."""
    return _json(await _state(request).mesh.replicas(_session(request).token))


async def api_audio(request: web.Request) -> web.StreamResponse:
    item = _state(request).audio.get(request.match_info["reply_id"])
    if item is None:
        return _error("NOT_FOUND", "no audio kept for that reply (the console keeps the latest ones)", 404)
    mime, data = item
    return web.Response(body=data, content_type=mime)


# --- server-sent events ----------------------------------------------------------------------------


async def _sse_start(request: web.Request) -> web.StreamResponse | None:
    """The prepared event-stream response; None when the browser already went away."""
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    )
    for k, v in SECURITY_HEADERS.items():
        resp.headers.setdefault(k, v)
    try:
        await resp.prepare(request)
    except ConnectionResetError:
        return None
    return resp


async def _send(resp: web.StreamResponse, event: str, data: Any, event_id: str | None = None) -> None:
    text = f"event: {event}\n"
    if event_id is not None:
        text += f"id: {event_id}\n"
    text += "data: " + json.dumps(data, default=str, ensure_ascii=False) + "\n\n"
    await resp.write(text.encode())


_Relayed = dict[str, Any] | MeshError | None


async def _next_batch(
    queue: asyncio.Queue[_Relayed], *, catching_up: bool, tally: ReplyTally | None
) -> tuple[deque[dict[str, Any]], int, MeshError | None | bool]:
    """The next batch of relayed items: (the newest FEED_KEEP, how many came, the stream's end: False
    while it goes on, None when it ended, the MeshError it ended with)."""
    batch: deque[dict[str, Any]] = deque(maxlen=FEED_KEEP)
    count = 0
    item: _Relayed
    try:
        item = await asyncio.wait_for(queue.get(), timeout=HEARTBEAT_SECONDS / 3)
    except TimeoutError:
        item = {}
    deadline = time.monotonic() + (CATCH_UP_SECONDS if catching_up else FLUSH_SECONDS)
    while True:
        if item is None or isinstance(item, MeshError):
            return batch, count, item
        if item:
            batch.append(item)
            count += 1
            if tally is not None:
                tally.add(item)
        now = time.monotonic()
        if queue.empty():
            if now >= deadline:
                break
            # Catching up: a short lull means the replay has drained.
            wait = min(deadline - now, 0.1) if catching_up else max(deadline - now, 0.01)
            try:
                item = await asyncio.wait_for(queue.get(), timeout=wait)
            except TimeoutError:
                break
        else:
            item = queue.get_nowait()
    return batch, count, False


async def _stream_batches(
    request: web.Request,
    event: str,
    open_call: Callable[[int], Any],
    convert: Callable[[Any], dict[str, Any]],
    seq_of: Callable[[dict[str, Any]], int],
    tally: ReplyTally | None = None,
) -> web.StreamResponse:
    """Relay a gRPC server stream as batched SSE events; resumes after Last-Event-ID on reconnect.

    The first batch waits (up to CATCH_UP_SECONDS) until the replayed history has drained, so the page
    gets one batch of the latest FEED_KEEP items instead of many; later batches flush every
    FLUSH_SECONDS. Batches hold at most FEED_KEEP items; `skipped` says how many were left out, and a
    tally (when given) still counts every item."""
    st = _state(request)
    try:
        after = int(request.headers.get("Last-Event-ID") or request.query.get("after", "0") or 0)
    except ValueError:
        after = 0
    resp = await _sse_start(request)
    if resp is None:
        return web.Response(status=204)
    queue: asyncio.Queue[_Relayed] = asyncio.Queue(maxsize=10_000)
    call = open_call(after)

    async def reader() -> None:
        try:
            async for msg in read_stream(call):
                await queue.put(convert(msg))
            await queue.put(None)
        except MeshError as e:
            await queue.put(e)

    task = asyncio.create_task(reader())
    last_beat = time.monotonic()
    catching_up = True
    try:
        while not st.stopping.is_set():
            batch, count, ended = await _next_batch(queue, catching_up=catching_up, tally=tally)
            if count:
                catching_up = False
                payload: dict[str, Any] = {"items": list(batch), "skipped": count - len(batch)}
                if tally is not None:
                    payload["tally"] = tally.snapshot()
                await _send(resp, event, payload, str(seq_of(batch[-1])))
                last_beat = time.monotonic()
            elif time.monotonic() - last_beat > HEARTBEAT_SECONDS:
                await resp.write(b": keep-alive\n\n")
                last_beat = time.monotonic()
            if ended is not False:
                if isinstance(ended, MeshError):
                    await _send(resp, "error", ended.as_dict())
                break
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        task.cancel()
        call.cancel()
    return resp


async def sse_runs(request: web.Request) -> web.StreamResponse:
    mesh, token = _state(request).mesh, _session(request).token
    return await _stream_batches(
        request,
        "runs",
        lambda after: mesh.watch_run_events(token, after),
        lambda m: run_event_dict(m.event),
        lambda d: int(d["global_seq"]),
    )


async def sse_node_events(request: web.Request) -> web.StreamResponse:
    mesh, token = _state(request).mesh, _session(request).token
    return await _stream_batches(
        request,
        "nodes",
        lambda after: mesh.watch_node_events(token, after),
        lambda m: node_event_dict(m.event),
        lambda d: int(d["seq"]),
    )


def _reply_convert(st: ConsoleState) -> Callable[[Any], dict[str, Any]]:
    def convert(m: Any) -> dict[str, Any]:
        r = m.reply
        d = {
            "reply_id": r.reply_id,
            "cursor": r.cursor,
            "kind": short_name(run_control_pb2.ReplyKind, r.kind),
            "run_id": r.run_id,
            "session_key": r.session_key,
            "channel": r.channel,
            "text": r.text[:300],
            "delivery": short_name(run_control_pb2.DeliveryMode, r.delivery),
            "tts_fallback_reason": r.tts_fallback_reason,
            "engine": r.audio.voice,
            "has_audio": bool(r.audio.content),
            "audio_ms": r.audio.duration_ms,
        }
        if r.audio.content:
            st.audio[r.reply_id] = (
                _AUDIO_MIME.get(r.audio.encoding, "application/octet-stream"),
                r.audio.content,
            )
            st.audio.move_to_end(r.reply_id)
            while len(st.audio) > AUDIO_CACHE:
                st.audio.popitem(last=False)
        return d

    return convert


async def sse_replies(request: web.Request) -> web.StreamResponse:
    st, token = _state(request), _session(request).token
    return await _stream_batches(
        request,
        "replies",
        lambda after: st.mesh.stream_replies(token, after),
        _reply_convert(st),
        lambda d: int(d["cursor"]),
        tally=ReplyTally(),
    )


async def _poll_view(st: ConsoleState, s: ConsoleSession, view: str, q: Any) -> Any:
    mesh = st.mesh
    if view == "config":
        return await mesh.watchers(s.token)
    if view == "rollout":
        return await rollout_data(st, s.token, sample=True)
    if view == "reactions":
        return await mesh.rule_stats(s.token)
    if view == "nodes":
        status = {"online": nodes_pb2.NODE_STATUS_ONLINE, "offline": nodes_pb2.NODE_STATUS_OFFLINE}.get(
            q.get("status", ""), 0
        )
        return await mesh.list_nodes(
            s.token, status, int(q.get("page_size", 50) or 50), q.get("page_token", "")
        )
    if view == "audit":
        return await asyncio.to_thread(audit_data, st, q)
    if view == "status":
        return await mesh.get_status(s.token)
    if view == "replicas":
        return await mesh.replicas(s.token)
    if view == "sessions":
        state = _RUN_STATES.get(q.get("state", ""), 0)
        return await mesh.sessions_page(
            s.token, state, int(q.get("page_size", 25) or 25), q.get("page_token", "")
        )
    raise web.HTTPBadRequest(text="unknown view")


async def sse_poll(request: web.Request) -> web.StreamResponse:
    """A view's data, re-read every POLL_SECONDS and sent whenever it changed (live without a stream)."""
    st, s = _state(request), _session(request)
    view = request.match_info["view"]
    q = request.query
    first = await _poll_view(st, s, view, q)  # errors before the stream starts are plain JSON errors
    resp = await _sse_start(request)
    if resp is None:
        return web.Response(status=204)
    last = json.dumps(first, default=str, sort_keys=True)
    last_beat = time.monotonic()
    try:
        await _send(resp, view, first)
        while not st.stopping.is_set():
            try:
                await asyncio.wait_for(st.stopping.wait(), timeout=POLL_SECONDS)
                break
            except TimeoutError:
                pass
            if await st.sessions.get(s.session_id) is None:
                await _send(resp, "error", {"code": "UNAUTHENTICATED", "message": "signed out"})
                break
            try:
                data = await _poll_view(st, s, view, q)
            except MeshError as e:
                await _send(resp, "error", e.as_dict())
                if e.code == "UNAUTHENTICATED":
                    break
                continue
            text = json.dumps(data, default=str, sort_keys=True)
            if text != last:
                last = text
                await _send(resp, view, data)
                last_beat = time.monotonic()
            elif time.monotonic() - last_beat > HEARTBEAT_SECONDS:
                await resp.write(b": keep-alive\n\n")
                last_beat = time.monotonic()
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    return resp


# --- app -------------------------------------------------------------------------------------------


def build_app(state: ConsoleState) -> web.Application:
    app = web.Application(
        middlewares=[security_headers, require_session], client_max_size=MAX_UPLOAD_BYTES * 2
    )
    app[STATE] = state

    async def on_shutdown(app: web.Application) -> None:
        state.stopping.set()

    async def on_cleanup(app: web.Application) -> None:
        await state.mesh.close()
        state.audit.close()

    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    r = app.router
    r.add_get("/", index)
    r.add_get("/signin", signin_get)
    r.add_post("/signin", signin_post)
    r.add_post("/signout", signout)
    r.add_get("/healthz", lambda _r: _healthz())
    r.add_static("/static/", STATIC, show_index=False)
    r.add_get("/api/me", api_me)
    r.add_get("/api/status", api_status)
    r.add_get("/api/replicas", api_replicas)
    r.add_get("/api/sessions", api_sessions)
    r.add_get("/api/runs", api_runs)
    r.add_get("/api/runs/{run_id}", api_run)
    r.add_post("/api/cancel", api_cancel)
    r.add_get("/api/config", api_config)
    r.add_post("/api/config/preview", api_config_preview)
    r.add_post("/api/config/apply", api_config_apply)
    r.add_get("/api/config/history", api_config_history)
    r.add_post("/api/config/rollback", api_config_rollback)
    r.add_get("/api/config/watchers", api_watchers)
    r.add_get("/api/rollout", api_rollout)
    r.add_post("/api/rollout/snapshot", api_rollout_snapshot)
    r.add_get("/api/reactions/stats", api_reactions)
    r.add_get("/api/reactions/traces", api_traces)
    r.add_post("/api/reactions/flag", api_flag)
    r.add_get("/api/nodes", api_nodes)
    r.add_get("/api/canvas", api_canvas_list)
    r.add_get("/api/canvas/artifact", api_canvas_get)
    r.add_get("/api/canvas/raw", api_canvas_raw)
    r.add_post("/api/canvas/put", api_canvas_put)
    r.add_post("/api/canvas/delete", api_canvas_delete)
    r.add_get("/api/audit", api_audit)
    r.add_get("/api/audio/{reply_id}", api_audio)
    r.add_get("/api/stream/runs", sse_runs)
    r.add_get("/api/stream/node-events", sse_node_events)
    r.add_get("/api/stream/replies", sse_replies)
    r.add_get("/api/stream/poll/{view}", sse_poll)
    return app


async def _healthz() -> web.Response:
    return web.Response(text="ok")
