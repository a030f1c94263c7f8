"""Leases with fencing epochs in PostgreSQL: one owner at a time for a named thing (a run-control
session, a reaction partition, a node's stream), and writes refused when their owner is stale.

A lease is a row `(scope, name) → holder, address, epoch, expires_at` in the service's own schema
(add `MIGRATION_SQL` to the service's migrations). Times are the database's (`now()`), never a
replica's clock.

    lease = await leases.acquire(conn, "session", key, holder=replica_id, address="10.0.0.7:7002", ttl=5)
    if lease.holder == replica_id: …own it, at lease.epoch…      # else: lease.address owns it
    held = await leases.renew(conn, "session", replica_id, ttl=5)  # {name: epoch} still ours
    sql, params = leases.fence("session", replica_id, {key: epoch})  # FIRST statement of a write txn
    await leases.release(conn, "session", replica_id, {key: epoch})  # free it (idle)
    await leases.hand_over(conn, "session", replica_id, {key: epoch})  # expire now: survivors adopt it

Rules:
- `acquire` succeeds when the lease is free, released, expired, or already the caller's (a restarted
  process with the same holder id, or a holder that forgot it), and then ALWAYS bumps the epoch (a
  new incarnation): writes queued under an older epoch, even by the same holder, are refused. Holder
  ids must therefore be unique among live processes (e.g. host + listen address).
  When another holder's lease is live, it returns that holder's row (holder, address) unchanged.
- `renew` extends every lease the holder still holds (one statement) and returns them; a name
  missing from the answer was taken over: step down from it.
- `fence` is the first statement of every transaction that writes owned state: it takes FOR SHARE
  locks on the lease rows (so a takeover's UPDATE waits for this transaction to end, and a new owner
  reads state after the old owner's last commit) and raises SQLSTATE LF409 (`StaleEpoch`, naming the
  stale names) when any name is no longer held by `holder` at that epoch; the whole transaction is
  then refused. Expiry alone does not refuse a write: until someone else acquires (epoch + 1)
  nothing else has acted on the thing, so the holder's writes are still the only ones.
- `release` bumps the epoch and frees the row, so in-flight writes of the releasing holder are
  refused too (it has forgotten the state they were built on).
- Row locks are always taken in (scope, name) order, so renew and fence never deadlock.
- A process frozen inside a fenced transaction (SIGSTOP, a VM pause) keeps its FOR SHARE locks and
  so keeps a takeover waiting: give the writing connection `idle_in_transaction_session_timeout`
  (about ttl/2; run control's writer does) so the server ends such a session and frees the locks.
- `expired(conn, scope, or_holder=me)` lists what survivors should adopt (leases that expired or
  were handed over), plus the live ones of `me` (a restarted process's own, taken back at once).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

#: SQLSTATE raised by the fence when an epoch is stale.
#: (Class "LF" is not a standard class: psycopg raises a plain DatabaseError, never OperationalError,
#: so connection-retry paths never mistake a refusal for an outage.)
STALE_SQLSTATE = "LF409"

MIGRATION_SQL = """
CREATE TABLE leases (
  scope TEXT NOT NULL,
  name TEXT NOT NULL,
  holder TEXT NOT NULL DEFAULT '',
  address TEXT NOT NULL DEFAULT '',
  epoch BIGINT NOT NULL DEFAULT 0,
  expires_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  PRIMARY KEY (scope, name)
);
CREATE INDEX leases_by_holder ON leases (scope, holder);
CREATE INDEX leases_by_expiry ON leases (scope, expires_at) WHERE holder <> '';
CREATE FUNCTION lease_fence(p_scope TEXT, p_holder TEXT, p_names TEXT[], p_epochs BIGINT[])
RETURNS void LANGUAGE plpgsql AS $$
DECLARE stale TEXT[];
BEGIN
  PERFORM 1 FROM leases l WHERE l.scope = p_scope AND l.name = ANY(p_names) ORDER BY l.name FOR SHARE;
  SELECT array_agg(n.name ORDER BY n.name) INTO stale
    FROM unnest(p_names, p_epochs) AS n(name, epoch)
    LEFT JOIN leases l ON l.scope = p_scope AND l.name = n.name
   WHERE l.name IS NULL OR l.holder <> p_holder OR l.epoch <> n.epoch;
  IF stale IS NOT NULL THEN
    RAISE EXCEPTION USING ERRCODE = 'LF409', MESSAGE = 'stale lease epoch',
      DETAIL = array_to_json(stale)::text;
  END IF;
END $$;
"""

Conn = psycopg.AsyncConnection[tuple[Any, ...]]


@dataclass(frozen=True)
class Lease:
    scope: str
    name: str
    holder: str
    address: str
    epoch: int
    #: Seconds until expiry by the database's clock (negative: expired).
    expires_in: float

    def held_by(self, holder: str) -> bool:
        return self.holder == holder


class StaleEpoch(Exception):
    """A fenced write was refused: these names are no longer held at the epoch the writer used."""

    def __init__(self, scope: str, names: Sequence[str]) -> None:
        super().__init__(f"stale lease epoch for {len(names)} {scope}(s): {', '.join(names[:5])}")
        self.scope = scope
        self.names = tuple(names)
        #: The epochs the refused transaction was fenced with (set by the writer that knows them).
        self.epochs: dict[str, int] = {}


def stale_from(e: BaseException, scope: str) -> StaleEpoch | None:
    """The StaleEpoch a database error stands for (SQLSTATE LF409), else None."""
    if not isinstance(e, psycopg.Error) or e.sqlstate != STALE_SQLSTATE:
        return None
    detail = e.diag.message_detail or "[]"
    try:
        names = [str(n) for n in json.loads(detail)]
    except ValueError:
        names = []
    return StaleEpoch(scope, names)


def fence(scope: str, holder: str, epochs: Mapping[str, int]) -> tuple[str, tuple[object, ...]]:
    """The statement (and parameters) to run first in a transaction writing state owned under these
    epochs; the transaction fails with SQLSTATE LF409 when one is stale."""
    names = sorted(epochs)
    return (
        "SELECT lease_fence(%s, %s, %s::text[], %s::bigint[])",
        (scope, holder, names, [int(epochs[n]) for n in names]),
    )


_ACQUIRE = """
INSERT INTO leases AS l (scope, name, holder, address, epoch, expires_at)
VALUES (%s, %s, %s, %s, 1, now() + %s * interval '1 second')
ON CONFLICT (scope, name) DO UPDATE SET holder = EXCLUDED.holder, address = EXCLUDED.address,
  epoch = l.epoch + 1, expires_at = EXCLUDED.expires_at
WHERE l.holder = '' OR l.expires_at <= now() OR l.holder = EXCLUDED.holder
RETURNING l.holder, l.address, l.epoch, EXTRACT(EPOCH FROM l.expires_at - now())::float8
"""

_READ = (
    "SELECT holder, address, epoch, EXTRACT(EPOCH FROM expires_at - now())::float8 FROM leases "
    "WHERE scope = %s AND name = %s"
)


async def acquire(conn: Conn, scope: str, name: str, holder: str, address: str, ttl: float) -> Lease:
    """Take the lease when it is free or expired (epoch + 1); otherwise the current holder's row."""
    cur = await conn.execute(_ACQUIRE, (scope, name, holder, address, float(ttl)))
    row = await cur.fetchone()
    if row is None:
        cur = await conn.execute(_READ, (scope, name))
        row = await cur.fetchone()
        if row is None:  # released and deleted meanwhile: never happens (rows are kept); try again
            return await acquire(conn, scope, name, holder, address, ttl)
    return Lease(scope, name, str(row[0]), str(row[1]), int(row[2]), float(row[3]))


async def read(conn: Conn, scope: str, name: str) -> Lease | None:
    cur = await conn.execute(_READ, (scope, name))
    row = await cur.fetchone()
    if row is None:
        return None
    return Lease(scope, name, str(row[0]), str(row[1]), int(row[2]), float(row[3]))


async def renew(conn: Conn, scope: str, holder: str, ttl: float) -> dict[str, int]:
    """Extend every lease `holder` holds in `scope`; returns {name: epoch} of those still held."""
    cur = await conn.execute(
        "UPDATE leases l SET expires_at = now() + %s * interval '1 second' "
        "FROM (SELECT scope, name FROM leases WHERE scope = %s AND holder = %s ORDER BY name FOR UPDATE) k "
        "WHERE l.scope = k.scope AND l.name = k.name AND l.holder = %s RETURNING l.name, l.epoch",
        (float(ttl), scope, holder, holder),
    )
    return {str(r[0]): int(r[1]) for r in await cur.fetchall()}


async def release(conn: Conn, scope: str, holder: str, epochs: Mapping[str, int]) -> int:
    """Free these leases now (epoch + 1, so writes still in flight under the old epoch are refused);
    returns how many were still held."""
    if not epochs:
        return 0
    names = sorted(epochs)
    cur = await conn.execute(
        "UPDATE leases l SET holder = '', address = '', epoch = l.epoch + 1, expires_at = now() "
        "FROM unnest(%s::text[], %s::bigint[]) AS n(name, epoch) "
        "WHERE l.scope = %s AND l.name = n.name AND l.holder = %s AND l.epoch = n.epoch",
        (names, [int(epochs[n]) for n in names], scope, holder),
    )
    return cur.rowcount


async def hand_over(conn: Conn, scope: str, holder: str, epochs: Mapping[str, int]) -> int:
    """Expire these leases now, keeping them listed by `expired` (epoch + 1): a graceful stop hands
    its things to the survivors at once, without waiting for the expiry. Returns how many."""
    if not epochs:
        return 0
    names = sorted(epochs)
    cur = await conn.execute(
        "UPDATE leases l SET epoch = l.epoch + 1, expires_at = now() - interval '1 second' "
        "FROM unnest(%s::text[], %s::bigint[]) AS n(name, epoch) "
        "WHERE l.scope = %s AND l.name = n.name AND l.holder = %s AND l.epoch = n.epoch",
        (names, [int(epochs[n]) for n in names], scope, holder),
    )
    return cur.rowcount


async def expired(conn: Conn, scope: str, limit: int = 500, or_holder: str = "") -> list[Lease]:
    """Leases whose holder stopped renewing (expired, or handed over; not released): what a survivor
    takes over. `or_holder` adds the live leases of that holder id (a restarted process's own)."""
    cur = await conn.execute(
        "SELECT name, holder, address, epoch, EXTRACT(EPOCH FROM expires_at - now())::float8 FROM leases "
        "WHERE scope = %s AND holder <> '' AND (expires_at <= now() OR holder = %s) ORDER BY expires_at LIMIT %s",
        (scope, or_holder, limit),
    )
    return [
        Lease(scope, str(r[0]), str(r[1]), str(r[2]), int(r[3]), float(r[4])) for r in await cur.fetchall()
    ]


async def held(conn: Conn, scope: str) -> dict[str, int]:
    """How many live leases each holder has in `scope` (for operators and tests)."""
    cur = await conn.execute(
        "SELECT holder, count(*) FROM leases WHERE scope = %s AND holder <> '' AND expires_at > now() "
        "GROUP BY holder",
        (scope,),
    )
    return {str(r[0]): int(r[1]) for r in await cur.fetchall()}
