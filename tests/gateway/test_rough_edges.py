"""Rough edges found by driving the mesh through its public surface (issue 18): real grpcurl and
gRPC through a real gateway with the real services behind it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import grpc
import pytest
from flynn.v1 import (
    common_pb2,
    config_pb2,
    config_pb2_grpc,
    reactions_pb2,
    reactions_pb2_grpc,
    system_pb2,
    system_pb2_grpc,
    voice_pb2,
    voice_pb2_grpc,
)
from google.protobuf import duration_pb2, field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flynn_runtime.auth import Authenticator, TokenStore
from flynn_runtime.interceptor import ServerInterceptor
from flynn_runtime.rich_status import from_rpc_error
from tests.support.gateway import RealMesh
from tests.support.mesh import as_call, grpcurl

BIG_ID = "r" * 100_000
MANY = 20_000


@pytest.fixture
def channel(real_mesh: RealMesh) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(real_mesh.gateway.address) as ch:
        yield ch


# --- 1. Health/List ---------------------------------------------------------------------------


def test_health_list_answers_through_grpcurl_at_every_service(real_mesh: RealMesh) -> None:
    for name, proc in real_mesh.procs.items():
        out = grpcurl(proc.address, "grpc.health.v1.Health/List", data="{}")
        assert out.returncode == 0, (name, out.stderr)
        statuses = json.loads(out.stdout)["statuses"]
        assert statuses[""] == {"status": "SERVING"}, (name, statuses)


def test_unexpected_handlers_never_answer_internal(real_mesh: RealMesh) -> None:
    """Handlers the interceptor did not expect, each well-formed call answered as the handler meant:
    the library's servicer base (NotImplementedError) is UNIMPLEMENTED; a plain (non-async) function
    and a plain generator work; a handler that set a code before raising answers that code."""

    def plain_check(
        request: health_pb2.HealthCheckRequest, context: object
    ) -> health_pb2.HealthCheckResponse:
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    def plain_watch(
        request: health_pb2.HealthCheckRequest, context: object
    ) -> Iterator[health_pb2.HealthCheckResponse]:
        yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def preset_list(request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext) -> None:  # type: ignore[type-arg]
        context.set_code(grpc.StatusCode.FAILED_PRECONDITION)
        context.set_details("not now")
        raise RuntimeError("the handler meant FAILED_PRECONDITION")

    def handlers() -> grpc.GenericRpcHandler:  # type: ignore[type-arg]
        ser = health_pb2.HealthCheckResponse.SerializeToString
        return grpc.method_handlers_generic_handler(
            "grpc.health.v1.Health",
            {
                "Check": grpc.unary_unary_rpc_method_handler(
                    plain_check, health_pb2.HealthCheckRequest.FromString, ser
                ),
                "Watch": grpc.unary_stream_rpc_method_handler(
                    plain_watch, health_pb2.HealthCheckRequest.FromString, ser
                ),
                "List": grpc.unary_unary_rpc_method_handler(
                    preset_list,
                    health_pb2.HealthListRequest.FromString,
                    health_pb2.HealthListResponse.SerializeToString,
                ),
            },
        )

    async def call_all(server_handlers: object) -> list[object]:
        server = grpc.aio.server(
            interceptors=[ServerInterceptor(Authenticator(TokenStore(real_mesh.tokens.path)))]
        )
        if server_handlers is None:
            # The library's servicer base: Check/Watch/List all raise NotImplementedError.
            health_pb2_grpc.add_HealthServicer_to_server(health_pb2_grpc.HealthServicer(), server)
        else:
            server.add_generic_rpc_handlers((server_handlers,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        out: list[object] = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = health_pb2_grpc.HealthStub(ch)
                for make in (
                    lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=5),
                    lambda: stub.List(health_pb2.HealthListRequest(), timeout=5),
                ):
                    try:
                        out.append(await make())
                    except grpc.aio.AioRpcError as err:
                        out.append(err.code())
                try:
                    out.append([r async for r in stub.Watch(health_pb2.HealthCheckRequest(), timeout=5)])
                except grpc.aio.AioRpcError as err:
                    out.append(err.code())
        finally:
            await server.stop(None)
        return out

    unimplemented = grpc.StatusCode.UNIMPLEMENTED
    assert asyncio.run(call_all(None)) == [unimplemented, unimplemented, unimplemented]
    serving = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
    assert asyncio.run(call_all(handlers())) == [serving, grpc.StatusCode.FAILED_PRECONDITION, [serving]]


# --- 2. Errors never echo unbounded input -----------------------------------------------------


def _fails(call: object, code: grpc.StatusCode) -> grpc.RpcError:
    try:
        result = call()  # type: ignore[operator]
        if hasattr(result, "__iter__") and not isinstance(result, (str, bytes)):
            for _ in result:
                pass
    except grpc.RpcError as err:
        assert as_call(err).code() == code, (as_call(err).code(), as_call(err).details())
        rich = from_rpc_error(err)
        assert rich is not None, "the rich status details were lost"
        assert len(as_call(err).details() or "") <= 1000
        return err
    raise AssertionError("the call succeeded")


def _head(config: config_pb2_grpc.ConfigServiceStub, md: tuple[tuple[str, str], ...]) -> int:
    return int(config.GetConfig(config_pb2.GetConfigRequest(), metadata=md, timeout=10).revision)


def test_huge_ids_and_many_bad_entries_keep_the_error_model(
    real_mesh: RealMesh, channel: grpc.Channel
) -> None:
    md = real_mesh.tokens.md("operator")
    reactions = reactions_pb2_grpc.ReactionsStub(channel)
    voice = voice_pb2_grpc.VoiceStub(channel)
    system = system_pb2_grpc.SystemStub(channel)
    config = config_pb2_grpc.ConfigServiceStub(channel)
    engines = [f"bad-engine-{i}" for i in range(MANY)]
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    cases = {
        "GetRuleStats": (
            lambda: reactions.GetRuleStats(
                reactions_pb2.GetRuleStatsRequest(rule_id=BIG_ID), metadata=md, timeout=20
            ),
            invalid,
        ),
        "EvaluateEvent": (
            lambda: reactions.EvaluateEvent(
                reactions_pb2.EvaluateEventRequest(
                    dry_run=True,
                    event=reactions_pb2.ReactionEvent(
                        event_id=BIG_ID,
                        type=config_pb2.REACTION_EVENT_TYPE_MESSAGE_RECEIVED,
                        causation=common_pb2.Causation(fired_rule_ids=[BIG_ID[:300]] * 300),
                    ),
                    proposed_rules=[
                        config_pb2.ReactionRule(id=BIG_ID if i == 0 else f"rule-{i}", max_depth=-1)
                        for i in range(MANY)
                    ],
                ),
                metadata=md,
                timeout=20,
            ),
            invalid,
        ),
        "GetMetrics": (
            lambda: system.GetMetrics(
                system_pb2.GetMetricsRequest(services=[BIG_ID] * 3 + ["nope"] * MANY), metadata=md, timeout=20
            ),
            invalid,
        ),
        "GetMetrics-ids": (
            lambda: system.GetMetrics(
                system_pb2.GetMetricsRequest(services=[BIG_ID] * 3), metadata=md, timeout=20
            ),
            invalid,
        ),
        "Synthesize": (
            lambda: voice.Synthesize(
                voice_pb2.SynthesizeRequest(text="hello", engines=engines), metadata=md, timeout=20
            ),
            invalid,
        ),
        "Synthesize-ids": (
            lambda: voice.Synthesize(
                voice_pb2.SynthesizeRequest(text="hello", engines=[BIG_ID]), metadata=md, timeout=20
            ),
            invalid,
        ),
        "StreamSynthesize": (
            lambda: voice.StreamSynthesize(
                voice_pb2.StreamSynthesizeRequest(text="hello", engines=engines), metadata=md, timeout=20
            ),
            invalid,
        ),
        "Transcribe": (
            lambda: voice.Transcribe(
                voice_pb2.TranscribeRequest(
                    audio_content=b"\x00" * 3200, config=voice_pb2.RecognitionConfig(engines=engines)
                ),
                metadata=md,
                timeout=20,
            ),
            invalid,
        ),
        "UpdateConfig": (
            lambda: config.UpdateConfig(
                config_pb2.UpdateConfigRequest(
                    reason="edges",
                    expected_revision=_head(config, md),
                    update_mask=field_mask_pb2.FieldMask(paths=["automation.reactions"]),
                    config=config_pb2.FlynnConfig(
                        automation=config_pb2.AutomationConfig(
                            reactions=[
                                config_pb2.ReactionRule(id=BIG_ID if i == 0 else f"rule-{i}", max_depth=-1)
                                for i in range(MANY)
                            ]
                        )
                    ),
                ),
                metadata=md,
                timeout=20,
            ),
            invalid,
        ),
        "GetRuleStats-unknown": (
            lambda: reactions.GetRuleStats(
                reactions_pb2.GetRuleStatsRequest(rule_id="r" * 256), metadata=md, timeout=20
            ),
            grpc.StatusCode.NOT_FOUND,
        ),
    }
    for name, (call, code) in cases.items():
        err = _fails(call, code)
        rich = from_rpc_error(err)
        assert rich is not None
        if code == invalid:
            assert rich.violations, name
            assert len(rich.violations) <= 20, name
        for v in rich.violations:
            assert len(v.field) <= 128 and len(v.description) <= 200, (name, v)
        for value in rich.metadata.values():
            assert len(value) <= 128, name


# --- grpcurl describe <package.Service.Method> (upstream grpc/grpc#34743) ---------------------


def test_grpcurl_describes_methods_through_the_gateway_and_directly(real_mesh: RealMesh) -> None:
    targets = {
        "gateway": [
            ("flynn.v1.RunControl.CancelRun", "rpc CancelRun ( .flynn.v1.CancelRunRequest )"),
            ("flynn.v1.System.GetStatus", "rpc GetStatus ( .flynn.v1.GetStatusRequest )"),
            ("flynn.v1.Agent.Run", "rpc Run ( stream .flynn.v1.RunRequest )"),
            ("grpc.health.v1.Health.Check", "rpc Check ( .grpc.health.v1.HealthCheckRequest )"),
        ],
        "queue": [("flynn.v1.RunControl.CancelRun", "rpc CancelRun ( .flynn.v1.CancelRunRequest )")],
        "nodes": [("flynn.v1.Canvas.PutArtifact", "rpc PutArtifact ( .flynn.v1.PutArtifactRequest )")],
    }
    for proc_name, symbols in targets.items():
        address = real_mesh.procs[proc_name].address
        for symbol, expected in symbols:
            out = grpcurl(address, "describe", symbol, token=real_mesh.tokens.operator)
            assert out.returncode == 0, (proc_name, symbol, out.stderr)
            assert f"{symbol} is a method:" in out.stdout, out.stdout
            assert expected in out.stdout, out.stdout
    # Still a clean "not found" for what does not exist.
    out = grpcurl(real_mesh.gateway.address, "describe", "flynn.v1.RunControl.NoSuchMethod")
    assert out.returncode != 0 and "not found" in out.stderr.lower(), out.stderr


# --- 5. One violation per invalid field --------------------------------------------------------


def test_config_validation_reports_each_invalid_field_once(
    real_mesh: RealMesh, channel: grpc.Channel
) -> None:
    md = real_mesh.tokens.md("operator")
    config = config_pb2_grpc.ConfigServiceStub(channel)
    rule = config_pb2.ReactionRule(
        id="edges-bad",
        enabled=True,
        trigger=config_pb2.ReactionTrigger(event=config_pb2.REACTION_EVENT_TYPE_MESSAGE_RECEIVED),
        cooldown=duration_pb2.Duration(seconds=-5),
        max_depth=-1,
        fire_cap=config_pb2.FireCap(max_fires=-3),
        rollout=config_pb2.Rollout(basis_points=20000),
        actions=[config_pb2.ReactionAction(ack=config_pb2.AckReactionAction(emoji="👀"))],
    )
    try:
        config.UpdateConfig(
            config_pb2.UpdateConfigRequest(
                config=config_pb2.FlynnConfig(automation=config_pb2.AutomationConfig(reactions=[rule])),
                update_mask=field_mask_pb2.FieldMask(paths=["automation.reactions"]),
                expected_revision=_head(config, md),
                dry_run=True,
            ),
            metadata=md,
            timeout=10,
        )
        raise AssertionError("an invalid rule was accepted")
    except grpc.RpcError as err:
        assert as_call(err).code() == grpc.StatusCode.INVALID_ARGUMENT
        rich = from_rpc_error(err)
    assert rich is not None
    # One spelling for an invalid field, the old one kept in the metadata for clients branching on it.
    assert rich.reason == "INVALID_FIELD" and rich.metadata["legacy_reason"] == "INVALID_CONFIG"
    fields = [v.field for v in rich.violations]
    p = "automation.reactions[0]"
    assert sorted(fields) == sorted(
        [f"{p}.cooldown", f"{p}.max_depth", f"{p}.fire_cap.max_fires", f"{p}.rollout.basis_points"]
    ), rich.violations


# --- The server's own enum validation, as PROTOCOL.md shows it (send the number) ---------------


def test_enum_validation_with_grpcurl_by_number(real_mesh: RealMesh) -> None:
    body = {"session_key": "s", "channel": "c", "idempotency_key": "k", "text": "x"}
    out = grpcurl(
        "-format-error",
        real_mesh.gateway.address,
        "flynn.v1.RunControl/PostReply",
        token=real_mesh.tokens.operator,
        data=json.dumps({**body, "kind": 99}),
    )
    assert out.returncode != 0
    status = json.loads(out.stdout or out.stderr)
    assert status["code"] == 3, status
    details = {d["@type"].rsplit("/", 1)[-1]: d for d in status["details"]}
    assert details["google.rpc.ErrorInfo"]["reason"] == "INVALID_FIELD"
    assert [v["field"] for v in details["google.rpc.BadRequest"]["field_violations"]] == ["kind"]
    # By name, grpcurl refuses locally: the request never reaches the server.
    out = grpcurl(
        real_mesh.gateway.address,
        "flynn.v1.RunControl/PostReply",
        token=real_mesh.tokens.operator,
        data=json.dumps({**body, "kind": "REPLY_KIND_NOPE"}),
    )
    assert out.returncode != 0 and "REPLY_KIND_NOPE" in out.stderr, out.stderr
