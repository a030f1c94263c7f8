"""Principals: bearer tokens bound to a named principal with a role and a scope, the required roles
per method, the methods each service credential may call, and failed-auth limits.

Tokens live in a YAML file that stores only SHA-256 hashes:

    tokens:
      - {name: alice, role: operator, sha256: <hex>}
      - {name: telegram, role: channel, channels: [telegram], sha256: <hex>}
      - {name: queue, role: service, sha256: <hex>}     # scope: SERVICE_SCOPES["queue"]
      - {name: agent, role: agent, sha256: <hex>}       # presented to external agents; grants nothing

plus the principals issued through flynn.v1.Principals (config service), pushed to every service.
Every service enforces the same policy table, so a call is checked at the gateway and again at the
owning service. docs/operations/SECURITY.md has the table of who may do what.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import hashlib
import ipaddress
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from flynn_runtime import errors, metrics

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Role(enum.Enum):
    OPERATOR = "operator"
    CHANNEL = "channel"
    NODE = "node"
    SERVICE = "service"
    AGENT = "agent"


ALL_CHANNELS = "*"
ALL_METHODS = "*"


@dataclass(frozen=True)
class Principal:
    """Who a credential belongs to: a name, a role, and a scope.

    channels: the channels a CHANNEL principal serves ("*" = every channel, for tests and tools only).
    methods: the methods a SERVICE principal may call (defaults to SERVICE_SCOPES[name]).
    sha256: hash of the credential that authenticated it (keys revocation and open streams).
    """

    name: str
    role: Role
    channels: frozenset[str] = frozenset()
    methods: frozenset[str] = frozenset()
    sha256: str = ""

    @property
    def fingerprint(self) -> str:
        return self.sha256[:16]

    def serves(self, channel: str) -> bool:
        """May this principal act on `channel`'s sessions? (Only channel principals are bound.)"""
        scope = self.channel_scope
        return scope is None or channel in scope

    @property
    def channel_scope(self) -> frozenset[str] | None:
        """The channels this principal is bound to, or None when it is not channel-bound."""
        if self.role is not Role.CHANNEL or ALL_CHANNELS in self.channels:
            return None
        return self.channels

    def may_call(self, method: str) -> bool:
        if self.role is not Role.SERVICE:
            return True
        return ALL_METHODS in self.methods or method in self.methods


ANONYMOUS = Principal("anonymous", Role.SERVICE)
current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "current_principal", default=None
)
current_client_address: contextvars.ContextVar[str] = contextvars.ContextVar(
    "current_client_address", default=""
)


def channel_denied(p: Principal, channel: str) -> errors.FlynnError:
    return errors.permission_denied(
        f"channel principal {p.name!r} does not serve channel {channel[:64]!r}",
        reason="CHANNEL_NOT_ALLOWED",
        channel=channel[:64],
        principal=p.name,
    )


def actor() -> str:
    """Name of the authenticated caller of the current RPC ("system" outside one)."""
    p = current_principal.get()
    return f"{p.role.value}:{p.name}" if p else "system"


def principal() -> Principal | None:
    return current_principal.get()


def client_address() -> str:
    """The real client address of the current RPC (after trusted proxies and the gateway hop)."""
    return current_client_address.get()


# --- policy ---------------------------------------------------------------------------------

PUBLIC = frozenset[Role]()  # marker: no bearer token needed
OP, CH, SV, ND = Role.OPERATOR, Role.CHANNEL, Role.SERVICE, Role.NODE

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
    "/flynn.v1.RunControl/WatchRunEvents": frozenset({OP, SV, CH}),
    "/flynn.v1.RunControl/StreamReplies": frozenset({OP, SV, CH}),
    "/flynn.v1.RunControl/PostReply": frozenset({OP, SV}),
    # Agent (served by external agents; run control calls it with the agent credential, which is
    # good for nothing else)
    "/flynn.v1.Agent/Run": frozenset({Role.AGENT}),
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
    # Replicas (served by every stateful service about its own replicas; not forwarded)
    "/flynn.v1.Replicas/ListReplicas": frozenset({OP, SV}),
    # Principals (served by the config service)
    "/flynn.v1.Principals/IssueToken": frozenset({OP}),
    "/flynn.v1.Principals/ListPrincipals": frozenset({OP}),
    "/flynn.v1.Principals/RevokeToken": frozenset({OP}),
    "/flynn.v1.Principals/WhoAmI": frozenset({OP, CH, SV, ND}),
    "/flynn.v1.Principals/WatchPrincipals": frozenset({SV}),
}

# What each mesh service calls on the others: a service credential is good for these methods only.
_CONFIG_CLIENT = frozenset(
    {
        "/flynn.v1.ConfigService/GetConfig",
        "/flynn.v1.ConfigService/WatchConfig",
        "/flynn.v1.ConfigService/ReportStatus",
        "/flynn.v1.Principals/WatchPrincipals",
        "/flynn.v1.Principals/WhoAmI",
    }
)
SERVICE_SCOPES: Mapping[str, frozenset[str]] = {
    "config": _CONFIG_CLIENT,
    "queue": _CONFIG_CLIENT
    | {"/flynn.v1.Voice/Synthesize", "/flynn.v1.Voice/StreamSynthesize", "/flynn.v1.Voice/ListVoices"},
    "reactions": _CONFIG_CLIENT
    | {
        "/flynn.v1.RunControl/WatchRunEvents",
        "/flynn.v1.RunControl/PostReply",
        "/flynn.v1.RunControl/SubmitMessage",
        "/flynn.v1.RunControl/GetRun",
        "/flynn.v1.RunControl/GetSession",
        "/flynn.v1.Nodes/WatchNodeEvents",
        "/flynn.v1.Nodes/InvokeNode",
        "/flynn.v1.Nodes/ListNodes",
        "/flynn.v1.Nodes/GetNode",
        "/flynn.v1.Canvas/PutArtifact",
        "/flynn.v1.Canvas/GetArtifact",
    },
    # InvokeNode: a replica forwards an invoke to the replica holding the node's stream (the caller
    # was authorized by the replica it reached).
    "nodes": _CONFIG_CLIENT | {"/flynn.v1.Nodes/InvokeNode"},
    "voice": _CONFIG_CLIENT,
    "gateway": _CONFIG_CLIENT
    | {
        "/flynn.v1.ConfigService/ListWatchers",
        "/flynn.v1.Replicas/ListReplicas",
        "/flynn.v1.Voice/Transcribe",
        "/flynn.v1.Canvas/PutArtifact",
        "/flynn.v1.RunControl/PostReply",
    },
}
# The only service principal whose hop headers (x-flynn-client-address) other services believe.
HOP_ASSERTING_SERVICES = frozenset({"gateway"})
# The only service principal that may set `causation` on messages and replies.
CAUSATION_SERVICES = frozenset({"reactions"})


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


def fingerprint(token: str) -> str:
    return hash_token(token)[:16]


def principal_from_entry(entry: Mapping[str, object]) -> Principal:
    """A tokens-file entry -> Principal (raises KeyError/ValueError on a malformed entry)."""
    name, role = str(entry["name"]), Role(str(entry["role"]))
    raw_channels = entry.get("channels")
    raw_methods = entry.get("methods")
    channels: frozenset[str] = frozenset()
    methods: frozenset[str] = frozenset()
    if role is Role.CHANNEL:
        # A channel principal without a channel list serves the channel of its own name.
        channels = (
            frozenset(str(c) for c in raw_channels) if isinstance(raw_channels, list) else frozenset({name})
        )
    if role is Role.SERVICE:
        methods = (
            frozenset(str(m) for m in raw_methods)
            if isinstance(raw_methods, list)
            else SERVICE_SCOPES.get(name, frozenset())
        )
    return Principal(name, role, channels, methods, str(entry["sha256"]))


class TokenStore:
    """Maps SHA-256 token hashes to principals.

    Two sources: the tokens file (FLYNN_TOKENS_FILE, reloaded when it changes) and the principals
    issued through flynn.v1.Principals (pushed by the config service with `set_issued`), minus the
    revoked hashes. `on_revoke` callbacks get the hashes that stopped being valid.
    """

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._mtime = -1.0
        self._checked = -10.0
        self._file: dict[str, Principal] = {}
        self._issued: dict[str, Principal] = {}
        self._revoked: frozenset[str] = frozenset()
        self._by_hash: dict[str, Principal] = {}
        self._lock = threading.Lock()
        self.on_revoke: list[Callable[[set[str]], None]] = []
        self._reload_if_changed()

    @classmethod
    def from_mapping(cls, entries: Mapping[str, Principal]) -> TokenStore:
        store = cls(None)
        store._file = {h: p if p.sha256 else replace(p, sha256=h) for h, p in entries.items()}
        store._rebuild()
        return store

    def _rebuild(self) -> None:
        merged = {**self._file, **self._issued}
        for h in self._revoked:
            merged.pop(h, None)
        with self._lock:
            gone = set(self._by_hash) - set(merged)
            self._by_hash = merged
        if gone:
            for cb in list(self.on_revoke):
                cb(gone)

    def _reload_if_changed(self, force: bool = False) -> None:
        if self._path is None:
            return
        now = time.monotonic()
        if not force and now - self._checked < 1.0:
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
            p = principal_from_entry(entry)
            loaded[p.sha256] = p
        self._file = loaded
        self._mtime = mtime
        self._rebuild()

    def poll(self) -> None:
        """Re-read the tokens file if it changed (called every second by the runtime)."""
        self._reload_if_changed(force=True)

    def set_issued(self, issued: Mapping[str, Principal], revoked: frozenset[str]) -> None:
        self._issued = dict(issued)
        self._revoked = revoked
        self._rebuild()

    def file_principals(self) -> list[Principal]:
        self._reload_if_changed()
        return list(self._file.values())

    def revoked(self) -> frozenset[str]:
        return self._revoked

    def lookup(self, token: str) -> Principal | None:
        self._reload_if_changed()
        # Comparing SHA-256 digests by dict lookup leaks nothing useful about the token itself.
        return self._by_hash.get(hash_token(token))


def write_tokens_file(
    path: Path,
    tokens: Mapping[str, tuple[Role, str]],
    channels: Mapping[str, list[str]] | None = None,
    methods: Mapping[str, list[str]] | None = None,
) -> None:
    """Write a tokens file (name -> (role, plaintext token)); only hashes reach the disk.
    `channels` / `methods` give the scope of channel / service principals by name."""
    entries: list[dict[str, object]] = []
    for name, (role, token) in tokens.items():
        entry: dict[str, object] = {"name": name, "role": role.value, "sha256": hash_token(token)}
        if channels and name in channels:
            entry["channels"] = list(channels[name])
        if methods and name in methods:
            entry["methods"] = list(methods[name])
        entries.append(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({"tokens": entries}, sort_keys=False))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


# --- failure rate limiting ------------------------------------------------------------------


class FailureLimiter:
    """Counts failed authentications per key in a sliding window.

    Keys are a claimed identity plus the real client address ("tok:<fingerprint>|<addr>",
    "node:<id>|<addr>") and the address alone ("addr:<addr>"). Only failures are ever checked
    against it: a valid credential is accepted whatever other callers did (see Authenticator).
    """

    def __init__(self, max_failures: int = 20, window_seconds: float = 60.0, max_peers: int = 10_000) -> None:
        self.max_failures = max_failures
        self.window = window_seconds
        self.max_peers = max_peers
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def retry_after(self, key: str) -> float | None:
        """Seconds to wait when `key` is over its limit, else None."""
        now = time.monotonic()
        with self._lock:
            q = self._failures.get(key)
            if not q:
                return None
            while q and now - q[0] > self.window:
                q.popleft()
            if len(q) >= self.max_failures:
                return max(self.window - (now - q[0]), 1.0)
            return None

    def refuse_if_limited(self, keys: Sequence[str]) -> None:
        """Raise RESOURCE_EXHAUSTED/AUTH_RATE_LIMITED when any of `keys` is over its limit."""
        for key in keys:
            retry = self.retry_after(key)
            if retry is not None:
                raise errors.resource_exhausted(
                    "too many failed authentications from this client; retry later",
                    reason="AUTH_RATE_LIMITED",
                    retry_after=retry,
                )

    def record(self, keys: Sequence[str]) -> None:
        now = time.monotonic()
        with self._lock:
            for key in keys:
                if key not in self._failures and len(self._failures) >= self.max_peers:
                    self._failures.pop(next(iter(self._failures)))
                self._failures.setdefault(key, deque(maxlen=self.max_failures * 2)).append(now)

    def guess(self, identity: str, address: str) -> None:
        """A wrong credential claiming `identity` from `address`: refuse if over the limit, else count it."""
        keys = (f"{identity}|{address}", f"addr:{address}")
        self.refuse_if_limited(keys)
        self.record(keys)


def peer_host(peer: str) -> str:
    """grpc peer string -> host: "ipv4:127.0.0.1:5555" -> "127.0.0.1", "ipv6:[::1]:5" -> "::1"."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6") or not rest:
        return peer
    host = rest.rsplit(":", 1)[0] if rest.count(":") >= 1 and not rest.endswith("]") else rest
    return host.strip("[]")


def parse_networks(text: str) -> tuple[IPNetwork, ...]:
    """ "10.0.0.0/8, 127.0.0.1" -> networks; raises ValueError naming a bad entry."""
    out: list[IPNetwork] = []
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ValueError(f"bad trusted proxy {part!r}: expected an IP address or CIDR") from None
    return tuple(out)


def address_in(host: str, nets: Sequence[IPNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(ip in n for n in nets)


def client_from_forwarded(direct: str, forwarded_for: str, trusted: Sequence[IPNetwork]) -> str:
    """The real client: `direct` unless it is a trusted proxy, then the right-most X-Forwarded-For
    entry that is not itself a trusted proxy (entries left of it could be forged by the client)."""
    if not forwarded_for or not address_in(direct, trusted):
        return direct
    hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
    for hop in reversed(hops):
        host = hop.strip("[]")
        if not address_in(host, trusted):
            return host[:64]
    return hops[0][:64] if hops else direct


# "host:port" of a connection the PROXY protocol front (proxy_front.py) pipes to the gRPC server, as
# the server sees its peer -> the client address from the PROXY header.
PROXIED_CLIENTS: dict[str, str] = {}


def proxied_client(peer: str) -> str | None:
    """The client behind a connection piped by the PROXY protocol front, from the grpc peer string."""
    if not PROXIED_CLIENTS:
        return None
    _, _, rest = peer.partition(":")
    host, _, port = rest.rpartition(":")
    return PROXIED_CLIENTS.get(f"{host.strip('[]')}:{port}")


HOP_CLIENT_HEADER = "x-flynn-client-address"
HOP_BY_HEADER = "x-flynn-forwarded-by"


def hop_metadata(service_token: str) -> tuple[tuple[str, str], ...]:
    """Headers the gateway adds to a forwarded call: the real client address, vouched for by the
    gateway's own credential (other services believe the address only with it)."""
    addr = current_client_address.get()
    if not service_token or not addr:
        return ()
    return ((HOP_CLIENT_HEADER, addr), (HOP_BY_HEADER, service_token))


class Authenticator:
    """Checks a call's bearer token against the policy; computes the real client address.

    A valid credential is always accepted (other callers' failures never lock it out); a missing
    token is refused but not counted (it is not a guess); a wrong token counts against its
    fingerprint + client address and against the client address, and past the limit is answered
    AUTH_RATE_LIMITED instead of INVALID_TOKEN.
    """

    def __init__(
        self,
        store: TokenStore,
        limiter: FailureLimiter | None = None,
        trusted_proxies: Sequence[IPNetwork] = (),
    ) -> None:
        self.store = store
        self.limiter = limiter or FailureLimiter()
        self.trusted_proxies = tuple(trusted_proxies)
        # Open streams per credential hash, so a revocation can end them (interceptor.py).
        self._streams: dict[str, set[asyncio.Task[object]]] = {}
        self._cut: set[asyncio.Task[object]] = set()
        store.on_revoke.append(self.cut_streams)

    def stream_opened(self, principal: Principal | None) -> asyncio.Task[object] | None:
        task = asyncio.current_task()
        if principal is None or not principal.sha256 or task is None:
            return None
        self._streams.setdefault(principal.sha256, set()).add(task)
        return task

    def stream_closed(self, principal: Principal | None, task: asyncio.Task[object] | None) -> None:
        if principal is None or task is None:
            return
        tasks = self._streams.get(principal.sha256)
        if tasks is not None:
            tasks.discard(task)
            if not tasks:
                del self._streams[principal.sha256]
        self._cut.discard(task)

    def was_cut(self, task: asyncio.Task[object] | None) -> bool:
        return task is not None and task in self._cut

    def cut_streams(self, hashes: set[str]) -> None:
        """End every open stream authenticated by one of `hashes` (revoked or removed credentials)."""
        for h in hashes:
            for task in list(self._streams.get(h, ())):
                if not task.done():
                    metrics.AUTH_REFUSED.labels("TOKEN_REVOKED").inc()
                    self._cut.add(task)
                    task.get_loop().call_soon_threadsafe(task.cancel)

    def client_address(self, metadata: Mapping[str, str], peer: str) -> str:
        direct = proxied_client(peer) or peer_host(peer)
        hop = metadata.get(HOP_CLIENT_HEADER)
        if hop:
            by = self.store.lookup(metadata.get(HOP_BY_HEADER, ""))
            if by is not None and by.role is Role.SERVICE and by.name in HOP_ASSERTING_SERVICES:
                return hop[:64]
        return client_from_forwarded(direct, metadata.get("x-forwarded-for", ""), self.trusted_proxies)

    def authenticate(self, method: str, metadata: Mapping[str, str], peer: str) -> Principal | None:
        roles = required_roles(method)
        if roles is None:
            raise errors.permission_denied(f"method {method} is not exposed", reason="METHOD_NOT_ALLOWED")
        address = self.client_address(metadata, peer)
        current_client_address.set(address)
        if roles is PUBLIC:
            return None
        header = metadata.get("authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            metrics.AUTH_REFUSED.labels("MISSING_TOKEN").inc()
            raise errors.unauthenticated(
                "missing bearer token: send 'authorization: Bearer <token>'", reason="MISSING_TOKEN"
            )
        principal = self.store.lookup(token)
        if principal is None:
            try:
                self.limiter.guess(f"tok:{fingerprint(token)}", address)
            except errors.FlynnError:
                metrics.AUTH_REFUSED.labels("AUTH_RATE_LIMITED").inc()
                raise
            metrics.AUTH_REFUSED.labels("INVALID_TOKEN").inc()
            raise errors.unauthenticated("unknown or revoked token", reason="INVALID_TOKEN")
        if principal.role not in roles or not principal.may_call(method):
            metrics.AUTH_REFUSED.labels("ROLE_NOT_ALLOWED").inc()
            allowed = ", ".join(sorted(r.value for r in roles)) or "none"
            why = (
                f"not in the scope of service credential {principal.name!r}"
                if principal.role in roles
                else f"allowed: {allowed}"
            )
            raise errors.permission_denied(
                f"role {principal.role.value!r} may not call {method} ({why})",
                reason="ROLE_NOT_ALLOWED",
                role=principal.role.value,
                method=method,
            )
        return principal
