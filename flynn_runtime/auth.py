"""Bearer-token authentication bound to roles, a required role per method, and failure rate-limiting.

Tokens live in a YAML file that stores only SHA-256 hashes:

    tokens:
      - {name: operator, role: operator, sha256: <hex>}

Every service loads the same file (FLYNN_TOKENS_FILE) and enforces the same policy table,
so a call is checked at the gateway and again at the owning service.
"""

from __future__ import annotations

import contextvars
import enum
import hashlib
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from flynn_runtime import errors


class Role(enum.Enum):
    OPERATOR = "operator"
    CHANNEL = "channel"
    NODE = "node"
    SERVICE = "service"


@dataclass(frozen=True)
class Principal:
    name: str
    role: Role


ANONYMOUS = Principal("anonymous", Role.SERVICE)
current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "current_principal", default=None
)


def actor() -> str:
    """Name of the authenticated caller of the current RPC ("system" outside one)."""
    p = current_principal.get()
    return f"{p.role.value}:{p.name}" if p else "system"


# --- policy ---------------------------------------------------------------------------------

PUBLIC = frozenset[Role]()  # marker: no bearer token needed
OP, CH, SV = Role.OPERATOR, Role.CHANNEL, Role.SERVICE

# Methods that need no bearer token: health, reflection, and Nodes/Connect (authenticated in-band
# by the node token in its Register message, see nodes_svc).
PUBLIC_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

POLICY: Mapping[str, frozenset[Role]] = {
    # ConfigService
    "/flynn.v1.ConfigService/GetConfig": frozenset({OP, SV}),
    "/flynn.v1.ConfigService/WatchConfig": frozenset({OP, SV}),
    "/flynn.v1.ConfigService/UpdateConfig": frozenset({OP}),
    "/flynn.v1.ConfigService/ListRevisions": frozenset({OP, SV}),
    "/flynn.v1.ConfigService/RollbackConfig": frozenset({OP}),
    "/flynn.v1.ConfigService/ExplainConfig": frozenset({OP, SV}),
    "/flynn.v1.ConfigService/ReportStatus": frozenset({SV, OP}),
    "/flynn.v1.ConfigService/ListWatchers": frozenset({OP, SV}),
    # RunControl
    "/flynn.v1.RunControl/SubmitMessage": frozenset({OP, SV, CH}),
    "/flynn.v1.RunControl/CancelRun": frozenset({OP, SV, CH}),
    "/flynn.v1.RunControl/GetRun": frozenset({OP, SV, CH}),
    "/flynn.v1.RunControl/ListRuns": frozenset({OP, SV}),
    "/flynn.v1.RunControl/GetSession": frozenset({OP, SV, CH}),
    "/flynn.v1.RunControl/WatchRunEvents": frozenset({OP, SV}),
    "/flynn.v1.RunControl/StreamReplies": frozenset({OP, SV, CH}),
    "/flynn.v1.RunControl/PostReply": frozenset({OP, SV}),
    # Agent (served by external agents; run control calls it with a service token)
    "/flynn.v1.Agent/Run": frozenset({SV}),
    # Reactions
    "/flynn.v1.Reactions/EvaluateEvent": frozenset({OP, SV}),
    "/flynn.v1.Reactions/ListRules": frozenset({OP, SV}),
    "/flynn.v1.Reactions/ListTraces": frozenset({OP, SV}),
    "/flynn.v1.Reactions/GetRuleStats": frozenset({OP, SV}),
    "/flynn.v1.Reactions/FlagFalsePositive": frozenset({OP}),
    # Nodes
    "/flynn.v1.Nodes/Connect": PUBLIC,
    "/flynn.v1.Nodes/ListNodes": frozenset({OP, SV}),
    "/flynn.v1.Nodes/GetNode": frozenset({OP, SV}),
    "/flynn.v1.Nodes/InvokeNode": frozenset({OP, SV}),
    "/flynn.v1.Nodes/IssueNodeToken": frozenset({OP}),
    "/flynn.v1.Nodes/RevokeNodeToken": frozenset({OP}),
    "/flynn.v1.Nodes/WatchNodeEvents": frozenset({OP, SV}),
    # Canvas
    "/flynn.v1.Canvas/PutArtifact": frozenset({OP, SV}),
    "/flynn.v1.Canvas/GetArtifact": frozenset({OP, SV}),
    "/flynn.v1.Canvas/ListArtifacts": frozenset({OP, SV}),
    "/flynn.v1.Canvas/DeleteArtifact": frozenset({OP, SV}),
    # Voice
    "/flynn.v1.Voice/Synthesize": frozenset({OP, SV}),
    "/flynn.v1.Voice/StreamSynthesize": frozenset({OP, SV}),
    "/flynn.v1.Voice/Transcribe": frozenset({OP, SV}),
    "/flynn.v1.Voice/ListVoices": frozenset({OP, SV}),
    # Gateway
    "/flynn.v1.Gateway/SendMessage": frozenset({OP, CH}),
    "/flynn.v1.Gateway/StreamReplies": frozenset({OP, CH}),
    "/flynn.v1.Gateway/CancelRun": frozenset({OP, CH}),
    # System
    "/flynn.v1.System/GetMetrics": frozenset({OP, SV}),
    "/flynn.v1.System/GetStatus": frozenset({OP, SV}),
}


def required_roles(method: str) -> frozenset[Role] | None:
    """Roles allowed on `method`; PUBLIC for unauthenticated methods; None for unknown methods."""
    if method.startswith(PUBLIC_PREFIXES):
        return PUBLIC
    return POLICY.get(method)


# --- tokens ---------------------------------------------------------------------------------


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def generate_token(prefix: str = "flt") -> str:
    return f"{prefix}_{secrets.token_urlsafe(32)}"


class TokenStore:
    """Maps SHA-256 token hashes to principals; reloads the file when it changes."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._mtime = -1.0
        self._checked = -10.0
        self._by_hash: dict[str, Principal] = {}
        self._lock = threading.Lock()
        self._reload_if_changed()

    @classmethod
    def from_mapping(cls, entries: Mapping[str, Principal]) -> TokenStore:
        store = cls(None)
        store._by_hash = dict(entries)
        return store

    def _reload_if_changed(self) -> None:
        if self._path is None:
            return
        now = time.monotonic()
        if now - self._checked < 1.0:
            return
        self._checked = now
        try:
            mtime = self._path.stat().st_mtime
        except FileNotFoundError:
            return
        if mtime == self._mtime:
            return
        data = yaml.safe_load(self._path.read_text()) or {}
        loaded: dict[str, Principal] = {}
        for entry in data.get("tokens", []):
            loaded[str(entry["sha256"])] = Principal(str(entry["name"]), Role(str(entry["role"])))
        with self._lock:
            self._by_hash = loaded
            self._mtime = mtime

    def lookup(self, token: str) -> Principal | None:
        self._reload_if_changed()
        # Comparing SHA-256 digests by dict lookup leaks nothing useful about the token itself.
        return self._by_hash.get(hash_token(token))


def write_tokens_file(path: Path, tokens: Mapping[str, tuple[Role, str]]) -> None:
    """Write a tokens file (name -> (role, plaintext token)); only hashes reach the disk."""
    entries = [
        {"name": name, "role": role.value, "sha256": hash_token(token)}
        for name, (role, token) in tokens.items()
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({"tokens": entries}, sort_keys=False))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


# --- failure rate limiting ------------------------------------------------------------------


class FailureLimiter:
    """Refuses a peer for a while after too many failed authentications in a sliding window."""

    def __init__(self, max_failures: int = 20, window_seconds: float = 60.0, max_peers: int = 10_000) -> None:
        self.max_failures = max_failures
        self.window = window_seconds
        self.max_peers = max_peers
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _peer_key(self, peer: str) -> str:
        # "ipv4:127.0.0.1:5555" -> "ipv4:127.0.0.1": the port changes per connection.
        return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer

    def check(self, peer: str) -> None:
        key = self._peer_key(peer)
        now = time.monotonic()
        with self._lock:
            q = self._failures.get(key)
            if not q:
                return
            while q and now - q[0] > self.window:
                q.popleft()
            if len(q) >= self.max_failures:
                retry = self.window - (now - q[0])
                raise errors.resource_exhausted(
                    "too many failed authentications; retry later",
                    reason="AUTH_RATE_LIMITED",
                    retry_after=max(retry, 1.0),
                )

    def record_failure(self, peer: str) -> None:
        key = self._peer_key(peer)
        with self._lock:
            if key not in self._failures and len(self._failures) >= self.max_peers:
                self._failures.pop(next(iter(self._failures)))
            self._failures.setdefault(key, deque(maxlen=self.max_failures * 2)).append(time.monotonic())


class Authenticator:
    """Checks a call's bearer token against the policy; sets current_principal."""

    def __init__(self, store: TokenStore, limiter: FailureLimiter | None = None) -> None:
        self.store = store
        self.limiter = limiter or FailureLimiter()

    def authenticate(self, method: str, metadata: Mapping[str, str], peer: str) -> Principal | None:
        roles = required_roles(method)
        if roles is None:
            raise errors.permission_denied(f"method {method} is not exposed", reason="METHOD_NOT_ALLOWED")
        if roles is PUBLIC:
            return None
        self.limiter.check(peer)
        header = metadata.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            self.limiter.record_failure(peer)
            raise errors.unauthenticated(
                "missing bearer token: send 'authorization: Bearer <token>'", reason="MISSING_TOKEN"
            )
        principal = self.store.lookup(token.strip())
        if principal is None:
            self.limiter.record_failure(peer)
            raise errors.unauthenticated("unknown or revoked token", reason="INVALID_TOKEN")
        if principal.role not in roles:
            allowed = ", ".join(sorted(r.value for r in roles))
            raise errors.permission_denied(
                f"role {principal.role.value!r} may not call {method} (allowed: {allowed})",
                reason="ROLE_NOT_ALLOWED",
                role=principal.role.value,
                method=method,
            )
        return principal
