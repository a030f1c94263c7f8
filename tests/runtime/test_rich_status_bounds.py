"""Whatever an error holds, its trailer stays under gRPC's 8 KiB metadata soft limit, and the short
metadata entries clients branch on survive."""

from __future__ import annotations

import base64

from flynn_runtime.errors import Code, FieldViolation, FlynnError
from flynn_runtime.rich_status import to_grpc_status, to_status_proto


def test_worst_case_error_fits_the_metadata_limit() -> None:
    huge = "x" * 100_000
    err = FlynnError(
        Code.UNAVAILABLE,
        huge,
        reason="ALL_ENGINES_FAILED",
        metadata={**{f"engine.{i}{huge[:60]}": huge for i in range(40)}, "cause": "timeout"},
        violations=[FieldViolation(f"engines[{i}]{huge}", huge) for i in range(20_000)],
        retry_after_seconds=1.0,
    )
    status = to_grpc_status(err)
    size = sum(len(k) + len(v) for k, v in status.trailing_metadata) + len(status.details)
    assert size < 8 * 1024, size
    proto = to_status_proto(err)
    info = next(d for d in proto.details if d.type_url.endswith("ErrorInfo"))
    assert b"cause" in info.value and b"timeout" in info.value
    assert b"violations_omitted" in info.value
    assert len(base64.b64encode(proto.SerializeToString())) < 8 * 1024
