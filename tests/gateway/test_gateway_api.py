"""flynn.v1.Gateway (SendMessage, StreamReplies, CancelRun) through the real gateway and the real run control."""

from __future__ import annotations

import json
import time
import uuid

import grpc
import pytest
from flynn.v1 import gateway_pb2, gateway_pb2_grpc, run_control_pb2

from flynn_runtime.rich_status import from_rpc_error
from tests.support.gateway import RealMesh
from tests.support.mesh import grpcurl


@pytest.fixture
def gateway_stub(real_mesh: RealMesh) -> gateway_pb2_grpc.GatewayStub:
    if "queue" not in real_mesh.procs:
        pytest.skip("run control (queue_svc) does not exist yet")
    return gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(real_mesh.gateway.address))


def test_send_message_then_final_reply_on_the_stream(
    real_mesh: RealMesh, gateway_stub: gateway_pb2_grpc.GatewayStub
) -> None:
    md = real_mesh.tokens.md("channel")
    session = f"test:{uuid.uuid4().hex[:8]}"
    req = gateway_pb2.SendMessageRequest(
        channel="test", session_key=session, sender="u1", text="hello gateway", idempotency_key=f"m-{session}"
    )
    resp = gateway_stub.SendMessage(req, metadata=md, timeout=10)
    assert resp.message_id
    assert resp.disposition != run_control_pb2.DISPOSITION_UNSPECIFIED

    again = gateway_stub.SendMessage(req, metadata=md, timeout=10)
    assert again.disposition == run_control_pb2.DISPOSITION_DUPLICATE
    assert again.message_id == resp.message_id

    stream = gateway_stub.StreamReplies(
        gateway_pb2.GatewayStreamRepliesRequest(after_cursor=0, channels=["test"]), metadata=md, timeout=30
    )
    final = None
    for item in stream:
        if item.reply.session_key == session and item.reply.kind == run_control_pb2.REPLY_KIND_FINAL:
            final = item.reply
            break
    stream.cancel()
    assert final is not None and final.reply_id and final.cursor > 0

    # The run has finished: cancelling it says so, it is not an error.
    cancel = gateway_stub.CancelRun(
        gateway_pb2.GatewayCancelRunRequest(run_id=final.run_id, reason="test"), metadata=md, timeout=10
    )
    assert cancel.outcome == run_control_pb2.CANCEL_OUTCOME_ALREADY_COMPLETED
    assert cancel.run_id == final.run_id


def test_send_message_names_every_missing_field(
    real_mesh: RealMesh, gateway_stub: gateway_pb2_grpc.GatewayStub
) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        gateway_stub.SendMessage(
            gateway_pb2.SendMessageRequest(), metadata=real_mesh.tokens.md("channel"), timeout=10
        )
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    err = from_rpc_error(exc.value)
    assert err is not None
    assert {v.field for v in err.violations} == {"channel", "session_key", "idempotency_key", "text"}


def test_send_message_with_grpcurl_and_a_channel_token(
    real_mesh: RealMesh, gateway_stub: gateway_pb2_grpc.GatewayStub
) -> None:
    session = f"cli:{time.monotonic_ns()}"
    data = {"channel": "cli", "session_key": session, "text": "hi", "idempotency_key": session}
    out = grpcurl(
        real_mesh.gateway.address,
        "flynn.v1.Gateway/SendMessage",
        token=real_mesh.tokens.channel,
        data=json.dumps(data),
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["message_id"]
    # A node token may not use the channel door.
    out = grpcurl(
        real_mesh.gateway.address,
        "flynn.v1.Gateway/SendMessage",
        token=real_mesh.tokens.node,
        data=json.dumps(data),
    )
    assert "Code: PermissionDenied" in out.stderr
