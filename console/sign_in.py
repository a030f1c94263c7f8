"""Server-side console sessions: an opaque cookie id maps to the operator's bearer token.

The token never leaves the server after sign-in: the browser holds only the random session id in an
HttpOnly, SameSite=Strict cookie. Sessions expire when idle and in absolute terms, and the table is
bounded (the oldest session is evicted first).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

COOKIE = "flynn_console"
IDLE_SECONDS = 8 * 3600
MAX_AGE_SECONDS = 24 * 3600
MAX_SESSIONS = 1000


@dataclass
class ConsoleSession:
    session_id: str
    token: str
    operator: str
    created: float
    last_used: float
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(24))

    @property
    def actor(self) -> str:
        return f"operator:{self.operator}"

    @property
    def token_fingerprint(self) -> str:
        """Short hash of the token for the audit log (never the token itself)."""
        return hashlib.sha256(self.token.encode()).hexdigest()[:12]


class SessionTable:
    def __init__(
        self,
        idle_seconds: float = IDLE_SECONDS,
        max_age_seconds: float = MAX_AGE_SECONDS,
        max_sessions: int = MAX_SESSIONS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._idle = idle_seconds
        self._max_age = max_age_seconds
        self._max = max_sessions
        self._clock = clock
        self._sessions: OrderedDict[str, ConsoleSession] = OrderedDict()

    def create(self, token: str, operator: str) -> ConsoleSession:
        now = self._clock()
        sid = secrets.token_urlsafe(32)
        s = ConsoleSession(sid, token, operator, now, now)
        self._sessions[sid] = s
        while len(self._sessions) > self._max:
            self._sessions.popitem(last=False)
        return s

    def get(self, session_id: str | None) -> ConsoleSession | None:
        if not session_id:
            return None
        s = self._sessions.get(session_id)
        if s is None:
            return None
        now = self._clock()
        if now - s.last_used > self._idle or now - s.created > self._max_age:
            del self._sessions[session_id]
            return None
        s.last_used = now
        self._sessions.move_to_end(session_id)
        return s

    def drop(self, session_id: str | None) -> None:
        if session_id:
            self._sessions.pop(session_id, None)

    def __len__(self) -> int:
        return len(self._sessions)


class SessionStore(Protocol):
    """Where sign-in sessions live: this process's memory (MemorySessions) or, with a database, the
    shared table of console/session_store_pg.py (a restart or another console replica keeps them)."""

    async def create(self, token: str, operator: str) -> ConsoleSession: ...

    async def get(self, session_id: str | None) -> ConsoleSession | None: ...

    async def drop(self, session_id: str | None) -> None: ...


class MemorySessions:
    """SessionStore over a SessionTable (no database configured)."""

    def __init__(self, table: SessionTable | None = None) -> None:
        self.table = table or SessionTable()

    async def create(self, token: str, operator: str) -> ConsoleSession:
        return self.table.create(token, operator)

    async def get(self, session_id: str | None) -> ConsoleSession | None:
        return self.table.get(session_id)

    async def drop(self, session_id: str | None) -> None:
        self.table.drop(session_id)


def clean_operator_name(raw: str) -> str:
    """The name an operator signs in under (shown in the audit log): letters, digits, . _ - @ only."""
    name = "".join(c for c in raw.strip() if c.isalnum() or c in "._-@")[:64]
    return name or "operator"


class SignInLimiter:
    """Bounds failed sign-ins per browser address and in total over a sliding window.

    The gateway limits failed authentications per peer, and for the gateway every console user is the
    same peer (the console). Refusing here first, below the gateway's limit (20 a minute), keeps one
    person guessing tokens from locking every operator out of the console.
    """

    def __init__(
        self,
        per_peer: int = 5,
        total: int = 10,
        window_seconds: float = 60.0,
        max_peers: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_peer = per_peer
        self.total = total
        self.window = window_seconds
        self.max_peers = max_peers
        self._clock = clock
        self._peers: OrderedDict[str, list[float]] = OrderedDict()
        self._all: list[float] = []

    def _trim(self, times: list[float], now: float) -> list[float]:
        return [t for t in times if now - t < self.window]

    def retry_after(self, peer: str) -> float:
        """Seconds until `peer` may try again (0 when it may now)."""
        now = self._clock()
        self._all = self._trim(self._all, now)
        mine = self._trim(self._peers.get(peer, []), now)
        if peer in self._peers:
            self._peers[peer] = mine
        waits = []
        if len(mine) >= self.per_peer:
            waits.append(self.window - (now - mine[0]))
        if len(self._all) >= self.total:
            waits.append(self.window - (now - self._all[0]))
        return max(waits, default=0.0)

    def record_failure(self, peer: str) -> None:
        now = self._clock()
        self._all.append(now)
        self._peers.setdefault(peer, []).append(now)
        self._peers.move_to_end(peer)
        while len(self._peers) > self.max_peers:
            self._peers.popitem(last=False)
