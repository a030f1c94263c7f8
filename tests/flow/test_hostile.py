"""Hostile input over every public method through the gateway: random and boundary messages, wrong
types (raw bytes that are not the request), huge fields, missing and bad tokens. Never INTERNAL or
UNKNOWN, every refusal says what is wrong, and every service is still SERVING afterwards."""

from __future__ import annotations

import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor as d
from google.protobuf import message_factory
from google.protobuf.message import Message

from flynn_runtime import topology
from gateway.descriptors import find_service
from gateway.routes import build_routes
from tests.support.flow import FlowMesh
from tests.support.mesh import as_call, grpcurl, wait_serving
from tests.support.voice import status_details

BAD_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
UNARY_TIMEOUT = 5.0
STREAM_TIMEOUT = 0.6
STRINGS = ["", "a", "x" * 257, "ü" * 300, "../../etc/passwd", "\x00nul", "🙂" * 70, "a" * 70_000, " ", "*"]
INTS = [0, 1, -1, 2**31 - 1, -(2**31), 7]
INT64S = [0, -1, 2**63 - 1, -(2**63), 10**12]
DOUBLES = [0.0, -1.0, 1e308, float("nan"), float("inf")]


def public_methods() -> list[tuple[str, Any]]:
    """(path, method descriptor) for every method the gateway serves or forwards."""
    out: list[tuple[str, Any]] = []
    for path in build_routes():
        svc, name = path.strip("/").split("/")
        out.append((path, find_service(svc).methods_by_name[name]))
    for svc in topology.SERVICES["gateway"].grpc_services:
        for m in find_service(svc).methods:
            out.append((f"/{svc}/{m.name}", m))
    return out


def fill(msg: Message, rng: random.Random, depth: int = 0) -> Message:
    for f in msg.DESCRIPTOR.fields:
        if rng.random() < 0.35:
            continue
        if f.is_repeated and not (f.message_type and f.message_type.GetOptions().map_entry):
            n = rng.choice([1, 2, 50])
            for _ in range(n):
                if f.type == d.FieldDescriptor.TYPE_MESSAGE:
                    if depth < 3:
                        fill(getattr(msg, f.name).add(), rng, depth + 1)
                else:
                    getattr(msg, f.name).append(scalar(f, rng))
        elif f.type == d.FieldDescriptor.TYPE_MESSAGE:
            if f.message_type is not None and f.message_type.GetOptions().map_entry:
                m = getattr(msg, f.name)
                mt: Any = f.message_type
                key_f, val_f = mt.fields_by_name["key"], mt.fields_by_name["value"]
                if val_f.type != d.FieldDescriptor.TYPE_MESSAGE:
                    m[scalar(key_f, rng)] = scalar(val_f, rng)
            elif depth < 3:
                fill(getattr(msg, f.name), rng, depth + 1)
        else:
            try:
                setattr(msg, f.name, scalar(f, rng))
            except (ValueError, TypeError):
                pass
    return msg


def scalar(f: Any, rng: random.Random) -> Any:
    t = f.type
    if t == d.FieldDescriptor.TYPE_STRING:
        return rng.choice(STRINGS)
    if t == d.FieldDescriptor.TYPE_BYTES:
        return rng.choice([b"", b"\x00\xff" * 10, rng.randbytes(2000), b"RIFF" + rng.randbytes(100)])
    if t == d.FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if t == d.FieldDescriptor.TYPE_ENUM:
        return rng.choice([0, 1, 2, 99, -5])
    if t in (d.FieldDescriptor.TYPE_INT64, d.FieldDescriptor.TYPE_SINT64, d.FieldDescriptor.TYPE_SFIXED64):
        return rng.choice(INT64S)
    if t in (d.FieldDescriptor.TYPE_UINT64, d.FieldDescriptor.TYPE_FIXED64):
        return rng.choice([0, 2**64 - 1])
    if t in (d.FieldDescriptor.TYPE_UINT32, d.FieldDescriptor.TYPE_FIXED32):
        return rng.choice([0, 2**32 - 1])
    if t in (d.FieldDescriptor.TYPE_DOUBLE, d.FieldDescriptor.TYPE_FLOAT):
        return rng.choice(DOUBLES)
    return rng.choice(INTS)


def payloads(m: Any, rng: random.Random, n_random: int) -> Iterator[tuple[str, bytes]]:
    cls = message_factory.GetMessageClass(m.input_type)
    yield "empty", b""
    yield "wrong type (garbage bytes)", b"\xff\xff\xff\xff\x0f\x01garbage"
    yield "wrong type (a string where a message is)", b"\x0a\x03abc\x12\x05hello\x1a\x02\x08\x01"
    yield "wrong wire type", b"\x08\x96\x01\x10\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01\x1d\x00\x00\x80\x7f"
    for i in range(n_random):
        yield f"random #{i}", fill(cls(), rng).SerializeToString()


def call(channel: grpc.Channel, path: str, m: Any, body: bytes, md: Any) -> tuple[grpc.StatusCode, str, Any]:
    ident = lambda b: b  # noqa: E731
    try:
        if not m.client_streaming and not m.server_streaming:
            channel.unary_unary(path, request_serializer=ident, response_deserializer=ident)(
                body, metadata=md, timeout=UNARY_TIMEOUT
            )
        elif not m.client_streaming:
            for _ in channel.unary_stream(path, request_serializer=ident, response_deserializer=ident)(
                body, metadata=md, timeout=STREAM_TIMEOUT
            ):
                pass
        elif not m.server_streaming:
            channel.stream_unary(path, request_serializer=ident, response_deserializer=ident)(
                iter([body]), metadata=md, timeout=STREAM_TIMEOUT
            )
        else:
            for _ in channel.stream_stream(path, request_serializer=ident, response_deserializer=ident)(
                iter([body]), metadata=md, timeout=STREAM_TIMEOUT
            ):
                pass
        return grpc.StatusCode.OK, "", None
    except grpc.RpcError as e:
        return as_call(e).code(), as_call(e).details() or "", e


def test_channel_token_is_refused_on_operator_methods_with_grpcurl(mesh: FlowMesh) -> None:
    out = grpcurl(
        "-d",
        '{"page_size": 1}',
        mesh.gateway,
        "flynn.v1.ConfigService/ListRevisions",
        token=mesh.tokens.channel,
    )
    assert out.returncode != 0 and "PermissionDenied" in out.stderr
    out = grpcurl(
        "-d", '{"channel": "cli"}', mesh.gateway, "flynn.v1.Gateway/SendMessage", token=mesh.tokens.channel
    )
    assert out.returncode != 0 and "InvalidArgument" in out.stderr
    assert "session_key" in out.stderr and "idempotency_key" in out.stderr


def test_oversized_voice_note_is_refused_naming_the_field(mesh: FlowMesh) -> None:
    from flynn.v1 import common_pb2

    with pytest.raises(grpc.RpcError) as ei:
        mesh.send("cli:big", "", "big-1", audio=common_pb2.Audio(content=b"\0" * (11 << 20)))
    assert as_call(ei.value).code() == grpc.StatusCode.INVALID_ARGUMENT
    _, fields = status_details(ei.value)
    assert fields == ["audio.content"]


@pytest.mark.parametrize("role", ["node"])
def test_other_roles_cannot_send(mesh: FlowMesh, role: str) -> None:
    out = grpcurl(
        "-d", '{"channel": "c", "session_key": "c:1", "text": "x", "idempotency_key": "k"}',
        mesh.gateway, "flynn.v1.Gateway/SendMessage", token=getattr(mesh.tokens, role),
    )  # fmt: skip
    assert out.returncode != 0 and "PermissionDenied" in out.stderr


# Last: its bad tokens get this peer rate-limited for a minute.
def test_hostile_sweep_never_internal_and_names_every_problem(mesh: FlowMesh) -> None:
    rng = random.Random(8)
    channel = grpc.insecure_channel(
        mesh.gateway,
        options=[("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)],
    )
    jobs: list[tuple[str, Any, str, bytes, Any]] = []
    for path, m in public_methods():
        n_random = 2 if m.server_streaming or m.client_streaming else 6
        for label, body in payloads(m, rng, n_random):
            jobs.append((path, m, label, body, mesh.md("operator")))
        jobs.append((path, m, "no token", b"", ()))
        jobs.append((path, m, "bad token", b"", (("authorization", "Bearer not-a-real-token"),)))
        jobs.append((path, m, "malformed authorization", b"", (("authorization", "Basic Zm9vOmJhcg=="),)))
    jobs.append(("/flynn.v1.Gateway/SendMessage", dict(public_methods())["/flynn.v1.Gateway/SendMessage"],
                 "huge (20 MiB)", b"\x22" + b"\x80\x80\x80\x0a" + b"x" * (20 << 20), mesh.md("channel")))  # fmt: skip

    def run(job: tuple[str, Any, str, bytes, Any]) -> tuple[str, str, grpc.StatusCode, str, Any]:
        path, m, label, body, md = job
        code, details, err = call(channel, path, m, body, md)
        return path, label, code, details, err

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, jobs))
    channel.close()

    bad = [(p, lbl, c.name, det[:200]) for p, lbl, c, det, _ in results if c in BAD_CODES]
    assert not bad, "\n".join(map(str, bad))
    unnamed = [
        (p, lbl, c.name) for p, lbl, c, det, _ in results if c != grpc.StatusCode.OK and not det.strip()
    ]
    assert not unnamed, unnamed
    for p, lbl, c, det, err in results:
        if lbl in ("no token", "bad token", "malformed authorization") and p != "/flynn.v1.Nodes/Connect":
            # Failed authentications are rate-limited per peer (RESOURCE_EXHAUSTED says so).
            assert c in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED), (
                p,
                lbl,
                c,
                det,
            )
        if c == grpc.StatusCode.INVALID_ARGUMENT and lbl.startswith("random"):
            _, fields = status_details(err)
            assert fields or "invalid" in det.lower() or ":" in det, (p, lbl, det)
    # Still serving everywhere (grpc.health is public: the bad tokens above got this peer rate-limited).
    for proc in mesh.procs.values():
        wait_serving(proc.address, timeout=10)
        assert proc.proc is not None and proc.proc.poll() is None, proc.log_tail()
