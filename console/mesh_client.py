"""Every read and write of the console, as gRPC calls to the gateway with the operator's bearer token."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from typing import Any

import grpc
from flynn.v1 import (
    canvas_pb2,
    canvas_pb2_grpc,
    config_pb2,
    config_pb2_grpc,
    nodes_pb2,
    nodes_pb2_grpc,
    principals_pb2,
    principals_pb2_grpc,
    reactions_pb2,
    reactions_pb2_grpc,
    run_control_pb2,
    run_control_pb2_grpc,
    system_pb2,
    system_pb2_grpc,
)
from google.protobuf import field_mask_pb2, json_format
from google.protobuf.message import Message

from flynn_runtime import config_yaml, topology
from flynn_runtime.channels import client_channel
from flynn_runtime.enum_names import short_name
from flynn_runtime.rich_status import from_rpc_error

CALL_TIMEOUT = 10.0
_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]
MAX_PAGE = 200

_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.OUT_OF_RANGE: 400,
}


class MeshError(Exception):
    """A gRPC failure, carried to the browser as JSON (code, message, field violations)."""

    def __init__(self, code: str, message: str, http_status: int, violations: list[dict[str, str]]) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status
        self.violations = violations

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "violations": self.violations}

    @classmethod
    def from_rpc(cls, err: grpc.aio.AioRpcError) -> MeshError:
        rich = from_rpc_error(err)
        violations = [
            {"field": v.field, "description": v.description} for v in (rich.violations if rich else [])
        ]
        code = err.code()
        return cls(code.name, err.details() or code.name, _HTTP_STATUS.get(code, 502), violations)


def to_dict(msg: Message) -> dict[str, Any]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def _page_size(n: int, default: int = 50) -> int:
    return max(1, min(n or default, MAX_PAGE))


def enum_name(enum: Any, number: int) -> str:
    """RUN_STATE_COMPLETED -> "COMPLETED" (the enum's prefix dropped); unknown numbers as digits."""
    return short_name(enum, number, lower=False)


def replica_dict(r: system_pb2.ReplicaStatus) -> dict[str, Any]:
    """A ReplicaStatus as the console's JSON (state "ready" / "not_ready" / "gone")."""
    return {
        "replica_id": r.replica_id,
        "address": r.address,
        "state": short_name(system_pb2.ReplicaState, r.state, lower=True),
        "start_time": r.start_time.ToJsonString() if r.HasField("start_time") else "",
        "heartbeat_time": r.heartbeat_time.ToJsonString() if r.HasField("heartbeat_time") else "",
        "heartbeat_age_seconds": r.heartbeat_age_seconds,
        "gone_after_seconds": r.gone_after_seconds,
        "database_reachable": r.database_reachable,
        "lease_held": r.lease_held,
        "holdings": {h.name: h.value for h in r.holdings},
        "detail": r.detail,
        "version": r.version,
    }


def run_event_dict(ev: run_control_pb2.RunEvent) -> dict[str, Any]:
    """A RunEvent as the console's JSON."""
    return {
        "global_seq": ev.global_seq,
        "session_seq": ev.session_seq,
        "type": enum_name(run_control_pb2.RunEventType, ev.type),
        "session_key": ev.session_key,
        "channel": ev.channel,
        "run_id": ev.run_id,
        "message_id": ev.message_id,
        "state": enum_name(run_control_pb2.RunState, ev.state) if ev.state else "",
        "error_kind": ev.error_kind,
        "reason": ev.reason,
        "text": ev.text[:500],
        "time": ev.time.ToJsonString() if ev.HasField("time") else "",
    }


def node_event_dict(ev: nodes_pb2.NodeEvent) -> dict[str, Any]:
    """A NodeEvent as the console's JSON."""
    return {
        "seq": ev.seq,
        "type": enum_name(nodes_pb2.NodeEventType, ev.type),
        "node_id": ev.node_id,
        "role": ev.role,
        "epoch": ev.epoch,
        "reason": ev.reason,
        "artifact_name": ev.artifact_name,
        "time": ev.time.ToJsonString() if ev.HasField("time") else "",
    }


def artifact_dict(a: canvas_pb2.Artifact) -> dict[str, Any]:
    """An artifact's metadata as the console's JSON."""
    return {
        "name": a.name,
        "version": a.version,
        "etag": a.etag,
        "content_type": a.content_type,
        "sha256": a.sha256,
        "size_bytes": a.size_bytes,
        "update_time": a.update_time.ToJsonString() if a.HasField("update_time") else "",
        "actor": a.actor,
    }


class MeshClient:
    def __init__(
        self,
        gateway_addr: str,
        max_message_bytes: int = 16 * 1024 * 1024,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.gateway_addr = gateway_addr
        self.channel = client_channel(
            gateway_addr, "", max_message_bytes=max_message_bytes, credentials=credentials
        )
        self.config = config_pb2_grpc.ConfigServiceStub(self.channel)
        self.runs = run_control_pb2_grpc.RunControlStub(self.channel)
        self.reactions = reactions_pb2_grpc.ReactionsStub(self.channel)
        self.nodes = nodes_pb2_grpc.NodesStub(self.channel)
        self.canvas = canvas_pb2_grpc.CanvasStub(self.channel)
        self.system = system_pb2_grpc.SystemStub(self.channel)
        self.principals = principals_pb2_grpc.PrincipalsStub(self.channel)

    async def close(self) -> None:
        await self.channel.close(None)

    @staticmethod
    def md(token: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {token}"),)

    async def call(self, method: Any, request: Message, token: str, deadline: float = CALL_TIMEOUT) -> Any:
        try:
            return await method(request, metadata=self.md(token), timeout=deadline)
        except grpc.aio.AioRpcError as err:
            raise MeshError.from_rpc(err) from None

    # --- sign-in -------------------------------------------------------------------------------

    async def verify_operator(self, token: str, client_address: str = "") -> tuple[MeshError | None, str]:
        """(None, operator name) when `token` is an operator's, else (why, ""). The name comes from the
        credential (Principals/WhoAmI), never from a form. `client_address` (the browser's, after the
        console's trusted proxies) travels as X-Forwarded-For, which the gateway believes only when the
        console is one of its trusted proxies."""
        md = self.md(token)
        if client_address:
            md = (*md, ("x-forwarded-for", client_address))
        try:
            me = await self.principals.WhoAmI(
                principals_pb2.WhoAmIRequest(), metadata=md, timeout=CALL_TIMEOUT
            )
        except grpc.aio.AioRpcError as err:
            return MeshError.from_rpc(err), ""
        if me.principal.role != principals_pb2.PRINCIPAL_ROLE_OPERATOR:
            role = principals_pb2.PrincipalRole.Name(me.principal.role)
            return MeshError(
                "PERMISSION_DENIED", f"{role} {me.principal.name!r} is not an operator", 403, []
            ), ""
        return None, me.principal.name

    # --- runs ----------------------------------------------------------------------------------

    async def list_runs(
        self, token: str, *, session_key: str = "", state: int = 0, page_size: int = 50, page_token: str = ""
    ) -> dict[str, Any]:
        """A page of runs, newest first (RunControl.ListRuns)."""
        resp = await self.call(
            self.runs.ListRuns,
            run_control_pb2.ListRunsRequest(
                session_key=session_key,
                state=run_control_pb2.RunState.ValueType(state),
                page_size=_page_size(page_size),
                page_token=page_token,
            ),
            token,
        )
        return {"runs": [self._run(r) for r in resp.runs], "next_page_token": resp.next_page_token}

    @staticmethod
    def _run(r: run_control_pb2.Run) -> dict[str, Any]:
        d = to_dict(r)
        d["output"] = r.output[-2000:]
        d["state"] = enum_name(run_control_pb2.RunState, r.state)
        d["mode"] = enum_name(config_pb2.QueueMode, r.mode)
        return d

    async def get_session(self, token: str, session_key: str) -> dict[str, Any]:
        resp = await self.call(
            self.runs.GetSession, run_control_pb2.GetSessionRequest(session_key=session_key), token
        )
        s = resp.session
        return {
            "session_key": s.session_key,
            "channel": s.channel,
            "active_run_id": s.active_run_id,
            "active_run_state": enum_name(run_control_pb2.RunState, s.active_run_state)
            if s.active_run_state
            else "",
            "queue_depth": len(s.queue),
            "queue": [to_dict(q) for q in s.queue[:50]],
            "mode": enum_name(config_pb2.QueueMode, s.effective_mode.mode),
            "mode_source": enum_name(config_pb2.ValueSource, s.effective_mode.source),
            "mode_revision": s.effective_mode.config_revision,
            "message_count": s.message_count,
            "run_count": s.run_count,
        }

    async def sessions_page(
        self, token: str, state: int = 0, page_size: int = 50, page_token: str = ""
    ) -> dict[str, Any]:
        """Sessions seen on one page of runs (newest first as ListRuns orders them), each with its
        live session state: at most page_size GetSession calls, run 8 at a time."""
        page = await self.list_runs(token, state=state, page_size=page_size, page_token=page_token)
        keys: list[str] = []
        for r in page["runs"]:
            k = r.get("session_key", "")
            if k and k not in keys:
                keys.append(k)
        sem = asyncio.Semaphore(8)

        async def one(k: str) -> dict[str, Any]:
            async with sem:
                try:
                    return await self.get_session(token, k)
                except MeshError as e:
                    return {"session_key": k, "error": e.message}

        sessions = await asyncio.gather(*(one(k) for k in keys))
        return {"sessions": list(sessions), "next_page_token": page["next_page_token"]}

    async def get_run(self, token: str, run_id: str) -> dict[str, Any]:
        resp = await self.call(self.runs.GetRun, run_control_pb2.GetRunRequest(run_id=run_id), token)
        return self._run(resp.run)

    async def run_timeline(
        self, token: str, run_id: str, session_key: str, max_events: int = 2000, quiet: float = 0.5
    ) -> list[dict[str, Any]]:
        """The run's events, replayed from its session's event history (bounded in count and time)."""
        out: list[dict[str, Any]] = []
        call = self.runs.WatchRunEvents(
            run_control_pb2.WatchRunEventsRequest(session_key=session_key, exclude_output=False),
            metadata=self.md(token),
            timeout=CALL_TIMEOUT,
        )
        seen = 0
        try:
            while seen < max_events:
                try:
                    resp: Any = await asyncio.wait_for(call.read(), timeout=quiet)
                except TimeoutError:
                    break
                if resp is _EOF:
                    break
                seen += 1
                ev = resp.event
                if ev.run_id == run_id or (ev.message_id and not ev.run_id):
                    out.append(run_event_dict(ev))
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise MeshError.from_rpc(err) from None
        finally:
            call.cancel()
        return out

    def watch_run_events(self, token: str, after_seq: int) -> Any:
        return self.runs.WatchRunEvents(
            run_control_pb2.WatchRunEventsRequest(after_seq=after_seq), metadata=self.md(token)
        )

    async def cancel(
        self, token: str, *, run_id: str, session_key: str, scope: int, reason: str
    ) -> dict[str, Any]:
        """Cancel a run or a session's active run (RunControl.CancelRun)."""
        resp = await self.call(
            self.runs.CancelRun,
            run_control_pb2.CancelRunRequest(
                run_id=run_id,
                session_key=session_key,
                scope=run_control_pb2.CancelScope.ValueType(scope),
                reason=reason,
            ),
            token,
        )
        return {
            "outcome": enum_name(run_control_pb2.CancelOutcome, resp.outcome),
            "run_id": resp.run_id,
            "state": enum_name(run_control_pb2.RunState, resp.state),
            "dropped_messages": resp.dropped_messages,
        }

    def stream_replies(self, token: str, after_cursor: int) -> Any:
        return self.runs.StreamReplies(
            run_control_pb2.StreamRepliesRequest(after_cursor=after_cursor), metadata=self.md(token)
        )

    # --- config --------------------------------------------------------------------------------

    async def get_config(self, token: str) -> dict[str, Any]:
        resp = await self.call(self.config.GetConfig, config_pb2.GetConfigRequest(), token)
        flat = config_yaml.flatten(resp.config)
        return {
            "revision": resp.revision,
            "yaml": config_yaml.config_to_yaml(resp.config),
            "flat": [{"key": k, "value": config_yaml.to_json(v)} for k, v in sorted(flat.items())],
            "gates": gate_summary(resp.config),
        }

    async def update_key(
        self, token: str, *, key: str, value: Any, reason: str, expected_revision: int, dry_run: bool
    ) -> dict[str, Any]:
        """Set one config key, or preview it with `dry_run` (ConfigService.UpdateConfig)."""
        if config_yaml.field_path_error(config_pb2.FlynnConfig.DESCRIPTOR, key) is not None:
            raise MeshError(
                "INVALID_ARGUMENT",
                config_yaml.field_path_error(config_pb2.FlynnConfig.DESCRIPTOR, key) or "",
                400,
                [{"field": "key", "description": "not a settable config path"}],
            )
        try:
            cfg = config_yaml.dict_to_config({key: value})
        except config_yaml.ConfigParseError as e:
            raise MeshError(
                "INVALID_ARGUMENT",
                "the value does not fit the key",
                400,
                [{"field": v.field, "description": v.description} for v in e.violations],
            ) from None
        if not expected_revision:
            expected_revision = (
                await self.call(self.config.GetConfig, config_pb2.GetConfigRequest(), token)
            ).revision
        resp = await self.call(
            self.config.UpdateConfig,
            config_pb2.UpdateConfigRequest(
                config=cfg,
                update_mask=field_mask_pb2.FieldMask(paths=[key]),
                expected_revision=expected_revision,
                reason=reason,
                dry_run=dry_run,
            ),
            token,
        )
        return {
            "revision": resp.revision,
            "expected_revision": expected_revision,
            "dry_run": resp.dry_run,
            "unchanged": resp.unchanged,
            "diff": [to_dict(d) for d in resp.diff],
        }

    async def list_revisions(self, token: str, page_size: int = 20, page_token: str = "") -> dict[str, Any]:
        resp = await self.call(
            self.config.ListRevisions,
            config_pb2.ListRevisionsRequest(page_size=_page_size(page_size, 20), page_token=page_token),
            token,
        )
        revs = []
        for r in resp.revisions:
            d = to_dict(r)
            d["kind"] = enum_name(config_pb2.ConfigRevisionKind, r.kind)
            d["diff"] = d.get("diff", [])[:30]
            revs.append(d)
        return {"revisions": revs, "next_page_token": resp.next_page_token}

    async def rollback(
        self, token: str, to_revision: int, reason: str, dry_run: bool = False
    ) -> dict[str, Any]:
        head = (await self.call(self.config.GetConfig, config_pb2.GetConfigRequest(), token)).revision
        resp = await self.call(
            self.config.RollbackConfig,
            config_pb2.RollbackConfigRequest(
                to_revision=to_revision, expected_revision=head, reason=reason, dry_run=dry_run
            ),
            token,
        )
        return {
            "revision": resp.revision,
            "dry_run": resp.dry_run,
            "unchanged": resp.unchanged,
            "diff": [to_dict(d) for d in resp.diff],
        }

    async def watchers(self, token: str) -> dict[str, Any]:
        out: list[dict[str, Any]] = []
        page_token = ""
        head = 0
        for _ in range(10):  # at most 10 pages of watchers
            resp = await self.call(
                self.config.ListWatchers,
                config_pb2.ListWatchersRequest(page_size=MAX_PAGE, page_token=page_token),
                token,
            )
            head = resp.head_revision
            for w in resp.watchers:
                out.append(
                    {
                        "service": w.identity.service,
                        "instance_id": w.identity.instance_id,
                        "version": w.identity.version,
                        "connected": w.connected,
                        "applied_revision": w.applied_revision,
                        "last_nack_revision": w.last_nack_revision,
                        "last_nack_reason": w.last_nack_reason,
                        "last_seen_time": w.last_seen_time.ToJsonString()
                        if w.HasField("last_seen_time")
                        else "",
                        "stale": (not w.connected) or w.applied_revision < resp.head_revision,
                    }
                )
            page_token = resp.next_page_token
            if not page_token:
                break
        out.sort(key=lambda w: (w["service"], w["instance_id"]))
        return {"head_revision": head, "watchers": out}

    # --- system --------------------------------------------------------------------------------

    async def get_metrics(self, token: str) -> system_pb2.GetMetricsResponse:
        resp: system_pb2.GetMetricsResponse = await self.call(
            self.system.GetMetrics, system_pb2.GetMetricsRequest(), token
        )
        return resp

    async def get_status(self, token: str) -> dict[str, Any]:
        resp = await self.call(self.system.GetStatus, system_pb2.GetStatusRequest(), token)
        services = []
        for s in resp.services:
            d = to_dict(s)
            d["health"] = enum_name(system_pb2.ServiceHealth, s.health)
            services.append(d)
        return {"head_revision": resp.head_revision, "services": services}

    async def replicas(self, token: str) -> dict[str, Any]:
        """The replicas of each stateful service as they know themselves (System.GetStatus)."""
        resp = await self.call(self.system.GetStatus, system_pb2.GetStatusRequest(), token)
        services = []
        for s in resp.services:
            if s.service not in topology.SERVICES or not topology.SERVICES[s.service].stateful:
                continue
            services.append(
                {
                    "service": s.service,
                    "health": enum_name(system_pb2.ServiceHealth, s.health),
                    "detail": s.detail,
                    "replicas_detail": s.replicas_detail,
                    "replicas": [replica_dict(r) for r in s.replicas],
                }
            )
        return {"services": services}

    # --- reactions -----------------------------------------------------------------------------

    async def rule_stats(self, token: str) -> dict[str, Any]:
        resp = await self.call(self.reactions.GetRuleStats, reactions_pb2.GetRuleStatsRequest(), token)

        def one(r: reactions_pb2.RuleStats) -> dict[str, Any]:
            return {
                "rule_id": r.rule_id,
                "matches": r.matches,
                "skips": {enum_name(reactions_pb2.SkipReason, s.reason): s.count for s in r.skips},
                "false_positives": r.false_positives,
                "false_positive_rate": r.false_positive_rate,
            }

        return {"rules": [one(r) for r in resp.rules], "total": one(resp.total)}

    async def traces(
        self,
        token: str,
        *,
        rule_id: str,
        event_id: str,
        matched: bool | None,
        page_size: int,
        page_token: str,
    ) -> dict[str, Any]:
        """A page of reaction traces (Reactions.ListTraces)."""
        req = reactions_pb2.ListTracesRequest(
            rule_id=rule_id, event_id=event_id, page_size=_page_size(page_size), page_token=page_token
        )
        if matched is not None:
            req.matched = matched
        resp = await self.call(self.reactions.ListTraces, req, token)
        out = []
        for t in resp.traces:
            d = to_dict(t)
            d["skip_reason"] = enum_name(reactions_pb2.SkipReason, t.skip_reason) if t.skip_reason else ""
            d["event_type"] = enum_name(config_pb2.ReactionEventType, t.event_type)
            d["matched"] = t.matched
            out.append(d)
        return {"traces": out, "next_page_token": resp.next_page_token}

    async def flag_false_positive(self, token: str, match_id: str, reason: str) -> dict[str, Any]:
        resp = await self.call(
            self.reactions.FlagFalsePositive,
            reactions_pb2.FlagFalsePositiveRequest(match_id=match_id, reason=reason),
            token,
        )
        return {"match_id": match_id, "rule_id": resp.trace.rule_id, "already_flagged": resp.already_flagged}

    # --- nodes and canvas ------------------------------------------------------------------------

    async def list_nodes(self, token: str, status: int, page_size: int, page_token: str) -> dict[str, Any]:
        resp = await self.call(
            self.nodes.ListNodes,
            nodes_pb2.ListNodesRequest(
                status=nodes_pb2.NodeStatus.ValueType(status),
                page_size=_page_size(page_size),
                page_token=page_token,
            ),
            token,
        )
        nodes = []
        for n in resp.nodes:
            d = to_dict(n)
            d["status"] = enum_name(nodes_pb2.NodeStatus, n.status)
            d["epoch"] = n.epoch
            d["reconnect_count"] = n.reconnect_count
            nodes.append(d)
        return {"nodes": nodes, "next_page_token": resp.next_page_token}

    def watch_node_events(self, token: str, after_seq: int) -> Any:
        return self.nodes.WatchNodeEvents(
            nodes_pb2.WatchNodeEventsRequest(after_seq=after_seq), metadata=self.md(token)
        )

    async def list_artifacts(
        self, token: str, prefix: str, page_size: int, page_token: str
    ) -> dict[str, Any]:
        resp = await self.call(
            self.canvas.ListArtifacts,
            canvas_pb2.ListArtifactsRequest(
                prefix=prefix, page_size=_page_size(page_size), page_token=page_token
            ),
            token,
        )
        return {
            "artifacts": [artifact_dict(a) for a in resp.artifacts],
            "next_page_token": resp.next_page_token,
        }

    async def get_artifact(self, token: str, name: str, version: int) -> canvas_pb2.Artifact:
        resp = await self.call(
            self.canvas.GetArtifact, canvas_pb2.GetArtifactRequest(name=name, version=version), token
        )
        artifact: canvas_pb2.Artifact = resp.artifact
        return artifact

    async def artifact_view(self, token: str, name: str, version: int) -> dict[str, Any]:
        a = await self.get_artifact(token, name, version)
        d = artifact_dict(a)
        ct = a.content_type.split(";")[0].strip().lower()
        if ct.startswith("image/"):
            d["render"] = "image"
        else:
            text = a.content.decode("utf-8", errors="replace")
            if ct == "application/json" or ct.endswith("+json"):
                import json

                try:
                    text = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
                    d["render"] = "json"
                except ValueError:
                    d["render"] = "text"
            elif ct.startswith("text/") or not ct:
                d["render"] = "text"
            else:
                d["render"] = "binary"
                text = ""
            d["text"] = text[:200_000]
        return d

    async def put_artifact(
        self, token: str, *, name: str, content_type: str, content: bytes, etag: str
    ) -> dict[str, Any]:
        """Write the next version of a canvas artifact (Canvas.PutArtifact)."""
        resp = await self.call(
            self.canvas.PutArtifact,
            canvas_pb2.PutArtifactRequest(name=name, content_type=content_type, content=content, etag=etag),
            token,
        )
        return artifact_dict(resp.artifact)

    async def delete_artifact(self, token: str, name: str, etag: str) -> dict[str, Any]:
        resp = await self.call(
            self.canvas.DeleteArtifact, canvas_pb2.DeleteArtifactRequest(name=name, etag=etag), token
        )
        return {"deleted_versions": resp.deleted_versions}


async def read_stream(call: Any) -> AsyncIterator[Any]:
    """Messages of a server stream until it ends; gRPC errors become MeshError."""
    try:
        while True:
            msg = await call.read()
            if msg is _EOF:
                return
            yield msg
    except grpc.aio.AioRpcError as err:
        raise MeshError.from_rpc(err) from None


def gate_summary(cfg: config_pb2.FlynnConfig) -> list[dict[str, Any]]:
    """The feature gates with their global value, overrides and rollout percentage."""

    def pct(r: config_pb2.Rollout) -> str:
        return f"{r.basis_points / 100:g} %" if r.basis_points else ""

    q = cfg.server.queue
    n = cfg.server.nodes
    gates: list[dict[str, Any]] = [
        {
            "key": "server.queue.mode",
            "value": enum_name(config_pb2.QueueMode, q.mode),
            "overrides": [
                f"session {k} → {enum_name(config_pb2.QueueMode, v)}"
                for k, v in sorted(q.overrides.sessions.items())
            ][:20]
            + [
                f"channel {k} → {enum_name(config_pb2.QueueMode, v)}"
                for k, v in sorted(q.overrides.channels.items())
            ][:20],
            "rollout": (f"{enum_name(config_pb2.QueueMode, q.rollout.mode)} to " + pct(q.rollout.rollout))
            if q.rollout.rollout.basis_points
            else "",
        },
        {"key": "server.nodes.enabled", "value": str(n.enabled).lower(), "overrides": [], "rollout": ""},
        {
            "key": "server.nodes.allowed_roles",
            "value": ", ".join(n.allowed_roles) or "(any)",
            "overrides": [],
            "rollout": "",
        },
        {
            "key": "server.nodes.feature_gates.ui.canvas",
            "value": str(n.feature_gates.ui.canvas).lower(),
            "overrides": [],
            "rollout": pct(n.feature_gates.ui.canvas_rollout),
        },
        {
            "key": "tts.enabled",
            "value": str(cfg.tts.enabled).lower(),
            "overrides": [f"channel {c}" for c in cfg.tts.enabled_channels][:20],
            "rollout": pct(cfg.tts.rollout),
        },
        {
            "key": "audio.enabled",
            "value": str(cfg.audio.enabled).lower(),
            "overrides": [],
            "rollout": pct(cfg.audio.rollout),
        },
    ]
    for rule in cfg.automation.reactions[:100]:
        gates.append(
            {
                "key": f"automation.reactions[{rule.id}]",
                "value": "enabled" if rule.enabled else "disabled",
                "overrides": [],
                "rollout": pct(rule.rollout),
            }
        )
    return gates


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
