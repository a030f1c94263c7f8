"""Console sign-in sessions in PostgreSQL (schema flynn_console), shared by every console replica.

With a database configured, a console restart or a second console replica signs nobody out: the
session a browser's cookie names is a row every replica reads. The row never holds what would let a
reader of the database act as the operator:

- it is keyed by sha256(session id), not the id (the cookie value) itself;
- the operator's bearer token is encrypted with AES-256-GCM under a key derived from the session id
  (sha256("flynn-console-token" ‖ id)), with the row key as associated data. Only a request that
  presents the cookie can decrypt it; the database alone cannot.

Idle and absolute expiry are the memory table's (console/sign_in.py), on wall-clock time shared by
the replicas; `last_used` is written at most once a minute per session, expired rows are deleted on
each sign-in, and the table is bounded (the least recently used sessions go first).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from console.sign_in import IDLE_SECONDS, MAX_AGE_SECONDS, MAX_SESSIONS, ConsoleSession
from flynn_runtime.database import Database
from flynn_runtime.pg_migrations import Migration

SCHEMA = "flynn_console"
TOUCH_EVERY = 60.0

MIGRATIONS = [
    Migration(
        1,
        "sign-in sessions",
        """
        CREATE TABLE sessions (
            id_hash    TEXT PRIMARY KEY,
            operator   TEXT NOT NULL,
            csrf       TEXT NOT NULL,
            nonce      BYTEA NOT NULL,
            token_enc  BYTEA NOT NULL,
            created    DOUBLE PRECISION NOT NULL,
            last_used  DOUBLE PRECISION NOT NULL
        );
        CREATE INDEX sessions_last_used ON sessions(last_used);
        """,
    ),
]


def _id_hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def _key(session_id: str) -> bytes:
    return hashlib.sha256(b"flynn-console-token\x00" + session_id.encode()).digest()


def seal(session_id: str, token: str) -> tuple[bytes, bytes]:
    nonce = secrets.token_bytes(12)
    return nonce, AESGCM(_key(session_id)).encrypt(nonce, token.encode(), _id_hash(session_id).encode())


def unseal(session_id: str, nonce: bytes, sealed: bytes) -> str | None:
    try:
        return AESGCM(_key(session_id)).decrypt(nonce, sealed, _id_hash(session_id).encode()).decode()
    except (InvalidTag, ValueError):
        return None


class PgSessions:
    def __init__(
        self,
        db: Database,
        idle_seconds: float = IDLE_SECONDS,
        max_age_seconds: float = MAX_AGE_SECONDS,
        max_sessions: int = MAX_SESSIONS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self._idle = idle_seconds
        self._max_age = max_age_seconds
        self._max = max_sessions
        self._clock = clock

    async def create(self, token: str, operator: str) -> ConsoleSession:
        now = self._clock()
        sid = secrets.token_urlsafe(32)
        s = ConsoleSession(sid, token, operator, now, now)
        nonce, sealed = seal(sid, token)
        async with self.db.transaction() as c:
            await c.execute(
                "INSERT INTO sessions (id_hash, operator, csrf, nonce, token_enc, created, last_used)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (_id_hash(sid), operator, s.csrf, nonce, sealed, now, now),
            )
            await c.execute(
                "DELETE FROM sessions WHERE last_used < %s OR created < %s",
                (now - self._idle, now - self._max_age),
            )
            await c.execute(
                "DELETE FROM sessions WHERE id_hash IN ("
                " SELECT id_hash FROM sessions ORDER BY last_used DESC, created DESC OFFSET %s)",
                (self._max,),
            )
        return s

    async def get(self, session_id: str | None) -> ConsoleSession | None:
        if not session_id or len(session_id) > 256:
            return None
        key = _id_hash(session_id)
        async with self.db.connection() as c:
            cur = await c.execute(
                "SELECT operator, csrf, nonce, token_enc, created, last_used FROM sessions WHERE id_hash = %s",
                (key,),
            )
            row = await cur.fetchone()
            if row is None:
                return None
            operator, csrf, nonce, sealed, created, last_used = row
            now = self._clock()
            if now - float(last_used) > self._idle or now - float(created) > self._max_age:
                await c.execute("DELETE FROM sessions WHERE id_hash = %s", (key,))
                return None
            token = unseal(session_id, bytes(nonce), bytes(sealed))
            if token is None:
                return None
            if now - float(last_used) > TOUCH_EVERY:
                await c.execute("UPDATE sessions SET last_used = %s WHERE id_hash = %s", (now, key))
                last_used = now
        return ConsoleSession(session_id, token, str(operator), float(created), float(last_used), str(csrf))

    async def drop(self, session_id: str | None) -> None:
        if session_id:
            async with self.db.connection() as c:
                await c.execute("DELETE FROM sessions WHERE id_hash = %s", (_id_hash(session_id),))
