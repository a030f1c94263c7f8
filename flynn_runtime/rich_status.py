"""FlynnError <-> google.rpc.Status (the rich error model), via grpcio-status."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, cast

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from flynn_runtime.errors import ERROR_DOMAIN, MAX_VIOLATIONS, Code, FieldViolation, FlynnError
from flynn_runtime.timestamps import duration, duration_seconds

GRPC_CODE = {c: getattr(grpc.StatusCode, c.value) for c in Code}


# The last bound on what a status may carry, whoever built the error: gRPC refuses trailers over its
# metadata limit (8 KiB soft), and the caller would then get RESOURCE_EXHAUSTED with no details at all.
# The message goes twice (grpc-message and the Status), the details base64-encoded.
MAX_MESSAGE_CHARS = 400
MAX_FIELD_CHARS = 128
MAX_DESCRIPTION_CHARS = 200
MAX_VIOLATION_BYTES = 1500
MAX_METADATA_ENTRIES = 16
MAX_METADATA_BYTES = 1500
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 128


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _bounded_violations(
    violations: Sequence[FieldViolation],
) -> tuple[list[error_details_pb2.BadRequest.FieldViolation], int]:
    """The violations that fit (count and bytes), and how many were left out."""
    kept: list[error_details_pb2.BadRequest.FieldViolation] = []
    size = 0
    for v in violations[:MAX_VIOLATIONS]:
        fv = error_details_pb2.BadRequest.FieldViolation(
            field=_cut(v.field, MAX_FIELD_CHARS), description=_cut(v.description, MAX_DESCRIPTION_CHARS)
        )
        size += fv.ByteSize() + 3
        if kept and size > MAX_VIOLATION_BYTES:
            break
        kept.append(fv)
    return kept, len(violations) - len(kept)


def _bounded_metadata(err: FlynnError, omitted: int) -> dict[str, str]:
    """At most MAX_METADATA_ENTRIES entries within MAX_METADATA_BYTES, the shortest first (a map has
    no order; short entries such as `cause` or `reason` are what clients branch on)."""
    cut = sorted(
        (
            (_cut(k, MAX_METADATA_KEY_CHARS), _cut(v, MAX_METADATA_VALUE_CHARS))
            for k, v in err.metadata.items()
        ),
        key=lambda kv: (len(kv[0]) + len(kv[1]), kv[0]),
    )
    out: dict[str, str] = {}
    size = 0
    for k, v in cut[:MAX_METADATA_ENTRIES]:
        size += len(k.encode()) + len(v.encode()) + 6
        if size > MAX_METADATA_BYTES:
            break
        out[k] = v
    if omitted:
        out["violations_omitted"] = str(int(out.get("violations_omitted", "0") or 0) + omitted)
    return out


def to_status_proto(err: FlynnError) -> status_pb2.Status:
    details: list[any_pb2.Any] = []
    omitted = 0
    if err.violations:
        kept, omitted = _bounded_violations(err.violations)
        details.append(_pack(error_details_pb2.BadRequest(field_violations=kept)))
    info = error_details_pb2.ErrorInfo(
        reason=_cut(err.reason or err.code.value, MAX_METADATA_KEY_CHARS),
        domain=ERROR_DOMAIN,
        metadata=_bounded_metadata(err, omitted),
    )
    details.append(_pack(info))
    if err.retry_after_seconds is not None:
        retry = error_details_pb2.RetryInfo(retry_delay=duration(max(err.retry_after_seconds, 0.0)))
        details.append(_pack(retry))
    message = _cut(err.message, MAX_MESSAGE_CHARS)
    return status_pb2.Status(code=getattr(code_pb2, err.code.value), message=message, details=details)


def to_grpc_status(err: FlynnError) -> grpc.Status:
    status: grpc.Status = rpc_status.to_status(to_status_proto(err))
    return status


def _pack(msg: Message) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(msg)
    return out


#: The trailing metadata key of a rich status (google.rpc.Status with details).
DETAILS_KEY = "grpc-status-details-bin"


def answered(err: grpc.aio.AioRpcError) -> bool:
    """Whether a service answered with a rich status (its details in the trailing metadata), rather
    than the channel failing on the way (no details: the peer was unreachable, reset or timed out)."""
    trailing: Iterable[tuple[str, object]] = cast(Any, err.trailing_metadata() or ())
    return any(k == DETAILS_KEY for k, _ in trailing)


def from_rpc_error(err: grpc.RpcError) -> FlynnError | None:
    """Read a rich status back from a client-side error (None when the status carries no details, or
    details that do not match the call's code and message)."""
    try:
        status = rpc_status.from_call(err)  # type: ignore[arg-type]
    except ValueError:
        return None
    if status is None:
        return None
    violations: list[FieldViolation] = []
    reason = ""
    metadata: dict[str, str] = {}
    retry: float | None = None
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend(FieldViolation(v.field, v.description) for v in bad.field_violations)
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
            metadata = dict(info.metadata)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            ri = error_details_pb2.RetryInfo()
            detail.Unpack(ri)
            retry = duration_seconds(ri.retry_delay)
    code = Code(_status_code(status.code).name) if status.code else Code.INTERNAL
    return FlynnError(code, status.message, reason, metadata, violations, retry)


def _status_code(number: int) -> grpc.StatusCode:
    """The grpc.StatusCode of a google.rpc.Status code number (ValueError when there is none)."""
    for sc in grpc.StatusCode:
        if sc.value[0] == number:
            return sc
    raise ValueError(number)


def violation_fields(err: grpc.RpcError) -> Sequence[str]:
    """Field paths named by a rich INVALID_ARGUMENT (empty when none)."""
    rich = from_rpc_error(err)
    return [v.field for v in rich.violations] if rich else []
