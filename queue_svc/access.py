"""Who may act on which sessions: channel binding, causation, and the per-principal session cap.

A channel principal is bound to its channels: it may submit to, read, stream and cancel only
sessions of those channels, and an empty channel filter means "mine". Only the reactions service
sets `causation` (a channel or operator that sends it gets INVALID_ARGUMENT naming the field).
docs/operations/SECURITY.md has the whole table.
"""

from __future__ import annotations

from flynn_runtime import auth, errors
from flynn_runtime.auth import Principal, Role, channel_denied
from queue_svc.run_control import RunControl

DEFAULT_MAX_SESSIONS_PER_PRINCIPAL = 10_000


def check_channel(p: Principal | None, channel: str) -> None:
    if p is not None and not p.serves(channel):
        raise channel_denied(p, channel)


async def check_session(p: Principal | None, rc: RunControl, session_key: str) -> None:
    """The session, if it exists, must belong to a channel the caller serves."""
    if p is None or p.channel_scope is None:
        return
    ch = await rc.session_channel(session_key)
    if ch is not None and not p.serves(ch):
        raise channel_denied(p, ch)


def channel_filter(
    p: Principal | None, requested: list[str], field: str = "channels"
) -> frozenset[str] | None:
    """The channels a stream may carry: None = every channel; an empty request means "mine"."""
    scope = p.channel_scope if p is not None else None
    if scope is None:
        return frozenset(requested) if requested else None
    if not requested:
        return scope
    outside = [c for c in requested if c not in scope]
    if outside:
        assert p is not None
        raise channel_denied(p, outside[0])
    return frozenset(requested)


def may_set_causation(p: Principal | None) -> bool:
    if p is None:  # in-process calls without an RPC
        return True
    return p.role is Role.SERVICE and (p.name in auth.CAUSATION_SERVICES or auth.ALL_METHODS in p.methods)


def check_causation(p: Principal | None, present: bool) -> None:
    if present and not may_set_causation(p):
        raise errors.invalid_argument(
            "causation",
            "only the reactions service may set causation; leave it unset",
            reason="CAUSATION_NOT_ALLOWED",
        )


async def check_session_cap(p: Principal | None, rc: RunControl, session_key: str, limit: int) -> None:
    """A channel principal may open at most `limit` sessions over its channels."""
    if p is None or limit <= 0:
        return
    scope = p.channel_scope
    if scope is None or await rc.session_channel(session_key) is not None:
        return
    n = rc.sessions_in_channels(scope)
    if n >= limit:
        raise errors.resource_exhausted(
            f"channel principal {p.name!r} has {n} sessions; the limit is {limit} sessions per principal "
            "(--max-sessions-per-principal)",
            reason="SESSION_LIMIT",
            limit=str(limit),
            principal=p.name,
        )
