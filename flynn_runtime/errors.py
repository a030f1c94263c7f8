"""Typed errors raised by domain code; the server interceptor turns them into rich gRPC statuses.

Domain modules raise these and never import grpc. The mapping to google.rpc.Status
(BadRequest field violations, ErrorInfo reasons, RetryInfo) lives in rich_status.py.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

ERROR_DOMAIN = "flynn.v1"


class Code(enum.Enum):
    """The gRPC status codes domain code may use (names match grpc.StatusCode)."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    ABORTED = "ABORTED"
    CANCELLED = "CANCELLED"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    INTERNAL = "INTERNAL"


@dataclass(frozen=True)
class FieldViolation:
    """One invalid field: the dotted path of the field and what is wrong with it."""

    field: str
    description: str


@dataclass
class FlynnError(Exception):
    """Base of every error that crosses a service boundary on purpose."""

    code: Code
    message: str
    reason: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    violations: list[FieldViolation] = field(default_factory=list)
    retry_after_seconds: float | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


# What an error may echo of the caller's input: values are cut to MAX_ECHO_CHARS, and at most
# MAX_VIOLATIONS field violations are kept (ErrorInfo metadata `violations_omitted` counts the rest),
# so the status trailer stays far below gRPC's metadata limits whatever the request held.
MAX_ECHO_CHARS = 64
MAX_VIOLATIONS = 20


def shown(value: object, limit: int = MAX_ECHO_CHARS) -> str:
    """`value` as an error may echo it: at most `limit` characters, with the full length when cut."""
    text = str(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…({len(text)} characters)"


def invalid_argument(field_path: str, description: str, reason: str = "INVALID_FIELD") -> FlynnError:
    """A single-field INVALID_ARGUMENT."""
    return FlynnError(
        Code.INVALID_ARGUMENT,
        f"invalid {field_path}: {description}",
        reason=reason,
        violations=[FieldViolation(field_path, description)],
    )


def invalid_fields(violations: list[FieldViolation], reason: str = "INVALID_FIELD") -> FlynnError:
    """INVALID_ARGUMENT naming every violated field (the first MAX_VIOLATIONS; the rest counted)."""
    kept = violations[:MAX_VIOLATIONS]
    omitted = len(violations) - len(kept)
    names = ", ".join(v.field for v in kept[:5]) + (", …" if len(kept) > 5 else "")
    summary = "; ".join(f"{v.field}: {v.description}" for v in kept[:5])
    more = f" (and {omitted} more invalid fields)" if omitted else ""
    return FlynnError(
        Code.INVALID_ARGUMENT,
        f"invalid request ({names}): {summary}{more}",
        reason=reason,
        violations=list(kept),
        metadata={"violations_omitted": str(omitted)} if omitted else {},
    )


def not_found(what: str, name: str, reason: str = "NOT_FOUND") -> FlynnError:
    return FlynnError(
        Code.NOT_FOUND, f"{what} {shown(name)!r} not found", reason=reason, metadata={what: shown(name)}
    )


def failed_precondition(message: str, reason: str, **metadata: str) -> FlynnError:
    return FlynnError(Code.FAILED_PRECONDITION, message, reason=reason, metadata=metadata)


def unavailable(
    message: str, reason: str = "UNAVAILABLE", retry_after: float = 1.0, **metadata: str
) -> FlynnError:
    return FlynnError(
        Code.UNAVAILABLE, message, reason=reason, metadata=metadata, retry_after_seconds=retry_after
    )


def permission_denied(message: str, reason: str = "PERMISSION_DENIED", **metadata: str) -> FlynnError:
    return FlynnError(Code.PERMISSION_DENIED, message, reason=reason, metadata=metadata)


def unauthenticated(message: str, reason: str = "UNAUTHENTICATED") -> FlynnError:
    return FlynnError(Code.UNAUTHENTICATED, message, reason=reason)


def resource_exhausted(
    message: str, reason: str, retry_after: float | None = None, **metadata: str
) -> FlynnError:
    return FlynnError(
        Code.RESOURCE_EXHAUSTED, message, reason=reason, metadata=metadata, retry_after_seconds=retry_after
    )


def shutting_down(service: str) -> FlynnError:
    """Told to every open stream on SIGTERM: reconnect (to another replica, or after the restart)."""
    return unavailable(f"{service} is shutting down; reconnect", reason="SHUTTING_DOWN", retry_after=1.0)
