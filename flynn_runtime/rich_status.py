"""FlynnError <-> google.rpc.Status (the rich error model), via grpcio-status."""

from __future__ import annotations

import math
from collections.abc import Sequence

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from flynn_runtime.errors import ERROR_DOMAIN, Code, FieldViolation, FlynnError

GRPC_CODE = {c: getattr(grpc.StatusCode, c.value) for c in Code}


def to_status_proto(err: FlynnError) -> status_pb2.Status:
    details: list[any_pb2.Any] = []
    if err.violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in err.violations
            ]
        )
        details.append(_pack(bad))
    info = error_details_pb2.ErrorInfo(
        reason=err.reason or err.code.value, domain=ERROR_DOMAIN, metadata=dict(err.metadata)
    )
    details.append(_pack(info))
    if err.retry_after_seconds is not None:
        frac, whole = math.modf(max(err.retry_after_seconds, 0.0))
        retry = error_details_pb2.RetryInfo(
            retry_delay=duration_pb2.Duration(seconds=int(whole), nanos=int(frac * 1e9))
        )
        details.append(_pack(retry))
    return status_pb2.Status(code=getattr(code_pb2, err.code.value), message=err.message, details=details)


def to_grpc_status(err: FlynnError) -> grpc.Status:
    status: grpc.Status = rpc_status.to_status(to_status_proto(err))
    return status


def _pack(msg: object) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(msg)  # type: ignore[arg-type]
    return out


def from_rpc_error(err: grpc.RpcError) -> FlynnError | None:
    """Read a rich status back from a client-side error (None when the status carries no details)."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
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
            retry = ri.retry_delay.seconds + ri.retry_delay.nanos / 1e9
    code = Code(grpc.StatusCode(_code_tuple(status.code)).name) if status.code else Code.INTERNAL
    return FlynnError(code, status.message, reason, metadata, violations, retry)


def _code_tuple(code: int) -> tuple[int, str]:
    for sc in grpc.StatusCode:
        if sc.value[0] == code:
            return sc.value  # type: ignore[no-any-return]
    raise ValueError(code)


def violation_fields(err: grpc.RpcError) -> Sequence[str]:
    """Field paths named by a rich INVALID_ARGUMENT (empty when none)."""
    rich = from_rpc_error(err)
    return [v.field for v in rich.violations] if rich else []
