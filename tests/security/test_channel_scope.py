"""Channel principals are bound to their channels, replayed through the real gateway: channel A's
token can't read, submit to or cancel channel B; an empty filter means "mine"; only the reactions
service sets causation; the agent's credential and other services' credentials are refused; a
channel principal's sessions are capped."""

from __future__ import annotations

import threading
import uuid

import grpc
import pytest
from flynn.v1 import (
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    nodes_pb2,
    nodes_pb2_grpc,
    principals_pb2,
    run_control_pb2,
    run_control_pb2_grpc,
)

from flynn_runtime.rich_status import from_rpc_error, violation_fields
from tests.security.conftest import SESSION_CAP, SecureMesh, bearer

CHANNEL = principals_pb2.PRINCIPAL_ROLE_CHANNEL
AGENT = principals_pb2.PRINCIPAL_ROLE_AGENT


def reason(err: grpc.RpcError) -> str:
    rich = from_rpc_error(err)
    return rich.reason if rich is not None else ""


def send(
    gw: gateway_pb2_grpc.GatewayStub, token: str, channel: str, session: str
) -> gateway_pb2.SendMessageResponse:
    resp: gateway_pb2.SendMessageResponse = gw.SendMessage(
        gateway_pb2.SendMessageRequest(
            channel=channel, session_key=session, text="hello", idempotency_key=uuid.uuid4().hex
        ),
        metadata=bearer(token),
        timeout=10,
    )
    return resp


@pytest.fixture(scope="module")
def two_channels(secure_mesh: SecureMesh) -> tuple[str, str]:
    return (
        secure_mesh.issue("adapter-a", CHANNEL, ["chan-a"]),
        secure_mesh.issue("adapter-b", CHANNEL, ["chan-b"]),
    )


def test_channel_b_cannot_submit_read_or_cancel_channel_a(
    secure_mesh: SecureMesh, two_channels: tuple[str, str]
) -> None:
    tok_a, tok_b = two_channels
    with secure_mesh.channel() as ch:
        gw = gateway_pb2_grpc.GatewayStub(ch)
        rc = run_control_pb2_grpc.RunControlStub(ch)
        sent = send(gw, tok_a, "chan-a", "chan-a:s1")
        assert sent.run_id

        # submit: to A's channel, and to A's session under B's own channel name
        with pytest.raises(grpc.RpcError) as e:
            send(gw, tok_b, "chan-a", "chan-a:s2")
        assert (
            e.value.code() == grpc.StatusCode.PERMISSION_DENIED and reason(e.value) == "CHANNEL_NOT_ALLOWED"
        )
        with pytest.raises(grpc.RpcError) as e:
            send(gw, tok_b, "chan-b", "chan-a:s1")
        assert (
            e.value.code() == grpc.StatusCode.PERMISSION_DENIED and reason(e.value) == "CHANNEL_NOT_ALLOWED"
        )
        with pytest.raises(grpc.RpcError) as e:  # the forwarded RunControl door too
            rc.SubmitMessage(
                run_control_pb2.SubmitMessageRequest(
                    channel="chan-a", session_key="chan-a:s1", text="x", idempotency_key="k1"
                ),
                metadata=bearer(tok_b),
                timeout=10,
            )
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED

        # cancel: by run id and by session, through both doors
        with pytest.raises(grpc.RpcError) as e:
            gw.CancelRun(
                gateway_pb2.GatewayCancelRunRequest(run_id=sent.run_id), metadata=bearer(tok_b), timeout=10
            )
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as e:
            gw.CancelRun(
                gateway_pb2.GatewayCancelRunRequest(session_key="chan-a:s1"),
                metadata=bearer(tok_b),
                timeout=10,
            )
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as e:
            rc.CancelRun(
                run_control_pb2.CancelRunRequest(run_id=sent.run_id), metadata=bearer(tok_b), timeout=10
            )
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED

        # read: the run, the session, and A's replies
        with pytest.raises(grpc.RpcError) as e:
            rc.GetRun(run_control_pb2.GetRunRequest(run_id=sent.run_id), metadata=bearer(tok_b), timeout=10)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as e:
            rc.GetSession(
                run_control_pb2.GetSessionRequest(session_key="chan-a:s1"), metadata=bearer(tok_b), timeout=10
            )
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as e:
            list(
                gw.StreamReplies(
                    gateway_pb2.GatewayStreamRepliesRequest(channels=["chan-a"]),
                    metadata=bearer(tok_b),
                    timeout=5,
                )
            )
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED

        # A may do all of it on its own session
        got = rc.GetRun(run_control_pb2.GetRunRequest(run_id=sent.run_id), metadata=bearer(tok_a), timeout=10)
        assert got.run.session_key == "chan-a:s1"
        gw.CancelRun(
            gateway_pb2.GatewayCancelRunRequest(session_key="chan-a:s1"), metadata=bearer(tok_a), timeout=10
        )


def _collect(stream: grpc.Call, out: list[str], stop_on: str) -> None:
    try:
        for item in stream:
            reply = item.reply if hasattr(item, "reply") else item.event
            out.append(reply.channel if hasattr(reply, "channel") else reply.session_key)
            if stop_on in out[-1]:
                return
    except grpc.RpcError:
        return


def test_empty_filter_means_mine(secure_mesh: SecureMesh, two_channels: tuple[str, str]) -> None:
    tok_a, tok_b = two_channels
    with secure_mesh.channel() as ch:
        gw = gateway_pb2_grpc.GatewayStub(ch)
        rc = run_control_pb2_grpc.RunControlStub(ch)
        send(gw, tok_a, "chan-a", "chan-a:mine")
        send(gw, tok_b, "chan-b", "chan-b:mine")
        # every reply from the beginning, for B with no filter: chan-a's replies never show up
        replies = gw.StreamReplies(
            gateway_pb2.GatewayStreamRepliesRequest(), metadata=bearer(tok_b), timeout=20
        )
        seen: list[str] = []
        t = threading.Thread(target=_collect, args=(replies, seen, "chan-b"))
        t.start()
        t.join(20)
        replies.cancel()
        assert seen and set(seen) == {"chan-b"}, seen
        # the same through the forwarded RunControl door, and for run events
        direct = rc.StreamReplies(run_control_pb2.StreamRepliesRequest(), metadata=bearer(tok_b), timeout=20)
        seen = []
        t = threading.Thread(target=_collect, args=(direct, seen, "chan-b"))
        t.start()
        t.join(20)
        direct.cancel()
        assert seen and set(seen) == {"chan-b"}, seen
        events = rc.WatchRunEvents(
            run_control_pb2.WatchRunEventsRequest(), metadata=bearer(tok_b), timeout=20
        )
        seen = []
        t = threading.Thread(target=_collect, args=(events, seen, "chan-b:mine"))
        t.start()
        t.join(20)
        events.cancel()
        assert seen and all(s.startswith("chan-b") for s in seen), seen


def test_causation_from_a_channel_is_refused_naming_the_field(
    secure_mesh: SecureMesh, two_channels: tuple[str, str]
) -> None:
    tok_a, _ = two_channels
    with secure_mesh.channel() as ch:
        rc = run_control_pb2_grpc.RunControlStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            rc.SubmitMessage(
                run_control_pb2.SubmitMessageRequest(
                    channel="chan-a",
                    session_key="chan-a:cz",
                    text="pretend to be a reaction",
                    idempotency_key="cz1",
                    causation=common_pb2.Causation(origin=common_pb2.ORIGIN_REACTION, depth=1),
                ),
                metadata=bearer(tok_a),
                timeout=10,
            )
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert list(violation_fields(e.value)) == ["causation"]
        # an operator may not either: only the reactions service
        with pytest.raises(grpc.RpcError) as e:
            rc.SubmitMessage(
                run_control_pb2.SubmitMessageRequest(
                    channel="chan-a",
                    session_key="chan-a:cz",
                    text="x",
                    idempotency_key="cz2",
                    causation=common_pb2.Causation(origin=common_pb2.ORIGIN_REACTION),
                ),
                metadata=secure_mesh.tokens.md("operator"),
                timeout=10,
            )
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_agent_credential_grants_nothing(secure_mesh: SecureMesh) -> None:
    agent = secure_mesh.tokens.agent
    issued_agent = secure_mesh.issue("agent-2", AGENT)
    with secure_mesh.channel() as ch:
        nodes = nodes_pb2_grpc.NodesStub(ch)
        for tok in (agent, issued_agent):
            with pytest.raises(grpc.RpcError) as e:
                list(
                    nodes.InvokeNode(
                        nodes_pb2.InvokeNodeRequest(
                            node_id="n1", command="canvas.present", idempotency_key="i"
                        ),
                        metadata=bearer(tok),
                        timeout=10,
                    )
                )
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(grpc.RpcError) as e:
                nodes.ListNodes(nodes_pb2.ListNodesRequest(), metadata=bearer(tok), timeout=10)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_service_credentials_are_scoped_to_what_they_call(secure_mesh: SecureMesh) -> None:
    with secure_mesh.channel() as ch:
        nodes = nodes_pb2_grpc.NodesStub(ch)
        # the voice service calls nothing on nodes; the reactions service may invoke nodes
        with pytest.raises(grpc.RpcError) as e:
            nodes.ListNodes(
                nodes_pb2.ListNodesRequest(),
                metadata=bearer(secure_mesh.tokens.for_service("voice")),
                timeout=10,
            )
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "scope" in (e.value.details() or "")
        nodes.ListNodes(
            nodes_pb2.ListNodesRequest(),
            metadata=bearer(secure_mesh.tokens.for_service("reactions")),
            timeout=10,
        )


def test_sessions_are_capped_per_channel_principal(secure_mesh: SecureMesh) -> None:
    tok = secure_mesh.issue("adapter-cap", CHANNEL, ["chan-cap"])
    with secure_mesh.channel() as ch:
        gw = gateway_pb2_grpc.GatewayStub(ch)
        for i in range(SESSION_CAP):
            send(gw, tok, "chan-cap", f"chan-cap:{i}")
        send(gw, tok, "chan-cap", "chan-cap:0")  # an existing session is fine
        with pytest.raises(grpc.RpcError) as e:
            send(gw, tok, "chan-cap", "chan-cap:one-too-many")
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert reason(e.value) == "SESSION_LIMIT"
        assert f"limit is {SESSION_CAP}" in (e.value.details() or "")
