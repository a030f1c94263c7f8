"""Session ownership of one run-control replica when several share a PostgreSQL database.

Each session is owned by exactly one replica at a time through a lease row (flynn_runtime/leases.py,
scope "session") holding the owner's replica id, its address and a fencing epoch. The owner keeps
the session in memory and is the only replica that changes it; every batch it commits is fenced by
the epochs of the sessions it touches (store_pg.py), so a replica that lost a session (paused past
its lease, partitioned, or replaced) has its writes refused and steps down (run_control.py).

This module holds the bookkeeping (which sessions this replica owns, at which epoch) and the loops:
- renew: every ttl/3 one statement (bounded by ttl/3) extends all our leases; a session missing
  from the answer was taken over: step down. A watchdog steps down from every session whose lease
  has not been renewed for 0.7 × ttl (the database is away, or this replica is cut off), so its
  agent calls stop before anyone else can adopt the session and recover them.
- owner hints: a replica asked about a session another live replica owns reads the lease (a plain
  SELECT: no write, no row lock that would hold up the owner's fenced commits) and remembers the
  owner's address until that lease's expiry, so the next calls about the session are forwarded at
  once without a database round trip (`owner_hint`). A hint is dropped when its owner does not answer
  or answers that it no longer owns the session; acting on a stale one only costs a retry.
- takeover: every `takeover_seconds`, expired leases (their owner died or was paused) are adopted
  by whichever surviving replica acquires them first; the adopter loads the session's state and
  recovers its runs with the restart policy (RunControl.adopt).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from flynn_runtime import leases
from flynn_runtime.database import Database
from flynn_runtime.replica_registry import Heartbeat
from queue_svc.store_pg import SESSION_SCOPE

log = logging.getLogger(__name__)


class NotOwner(Exception):
    """Another live replica owns the session: serve the call there (servicer.py forwards it)."""

    def __init__(self, session_key: str, address: str, expires_in: float, hinted: bool = False) -> None:
        super().__init__(f"session {session_key!r} is owned by the run-control replica at {address}")
        self.session_key = session_key
        self.address = address
        self.expires_in = expires_in
        #: From a remembered owner (`owner_hint`), not read from the database for this call.
        self.hinted = hinted


#: At most this many owner hints are kept (the oldest go first).
MAX_HINTS = 10_000


@dataclass(frozen=True)
class OwnershipSettings:
    holder: str
    address: str
    ttl: float = 5.0
    takeover_seconds: float = 0.5


class Ownership:
    def __init__(self, db: Database, settings: OwnershipSettings) -> None:
        self.db = db
        self.settings = settings
        self.holder = settings.holder
        self.owned: dict[str, int] = {}
        self._claimed_at: dict[str, float] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: list[asyncio.Task[None]] = []
        #: time.monotonic() when the last successful renewal started (the leases last at least until
        #: then + ttl by the database's clock).
        self._renewed = time.monotonic()
        #: session -> (owner's address, time.monotonic() until which its lease is known to hold)
        self._hints: dict[str, tuple[str, float]] = {}
        self.step_down: Callable[[list[str], str], None] = lambda keys, why: None
        self.adopt: Callable[[str], Awaitable[None]] | None = None
        #: Called with the connection after each renewal (the replica's heartbeat row): no timer of its own.
        self.heartbeat: Heartbeat | None = None

    def renewing(self) -> bool:
        """Whether the leases were renewed within 0.7 × the lease (what the watchdog steps down on)."""
        return time.monotonic() - self._renewed < 0.7 * self.settings.ttl

    def epoch_of(self, key: str) -> int:
        """The epoch this replica owns `key` at (0: not owned; a write under it is refused)."""
        return self.owned.get(key, 0)

    def lock(self, key: str) -> asyncio.Lock:
        lk = self._locks.get(key)
        if lk is None:
            lk = self._locks[key] = asyncio.Lock()
        return lk

    def drop_lock(self, key: str) -> None:
        lk = self._locks.get(key)
        if lk is not None and not lk.locked():
            del self._locks[key]

    def adopting(self, key: str) -> bool:
        """Whether the session's adoption (acquire, then load) is in progress."""
        lk = self._locks.get(key)
        return lk is not None and lk.locked()

    def owner_hint(self, key: str) -> NotOwner | None:
        """The live replica that owns `key` as last read here, while its lease is known to hold."""
        hint = self._hints.get(key)
        if hint is None:
            return None
        address, until = hint
        left = until - time.monotonic()
        if left <= 0:
            del self._hints[key]
            return None
        return NotOwner(key, address, left, hinted=True)

    def drop_hint(self, key: str) -> None:
        """The hinted owner did not answer, or no longer owns the session: look it up afresh."""
        self._hints.pop(key, None)

    async def acquire(self, key: str) -> leases.Lease:
        """Try to own `key`; on success it is recorded here (the caller then adopts its state). A lease
        another live replica holds is only read (no write, no row lock) and remembered as a hint."""
        async with self.db.connection() as conn:
            lease = await leases.read(conn, SESSION_SCOPE, key)
            if lease is None or lease.holder in ("", self.holder) or lease.expires_in <= 0:
                lease = await leases.acquire(
                    conn, SESSION_SCOPE, key, self.holder, self.settings.address, self.settings.ttl
                )
        if lease.held_by(self.holder):
            self.owned[key] = lease.epoch
            self._claimed_at[key] = time.monotonic()
            self._hints.pop(key, None)
        elif lease.address and lease.expires_in > 0:
            if len(self._hints) >= MAX_HINTS:
                del self._hints[next(iter(self._hints))]
            self._hints[key] = (lease.address, time.monotonic() + lease.expires_in)
        return lease

    def forget(self, keys: list[str]) -> dict[str, int]:
        out = {k: self.owned.pop(k) for k in keys if k in self.owned}
        for k in keys:
            self._claimed_at.pop(k, None)
            lk = self._locks.get(k)
            if lk is not None and not lk.locked():
                del self._locks[k]
        return out

    async def release(self, epochs: dict[str, int]) -> None:
        """Free leases of sessions that left memory (idle): the next call anywhere acquires anew."""
        if not epochs:
            return
        try:
            async with self.db.connection() as conn:
                await leases.release(conn, SESSION_SCOPE, self.holder, epochs)
        except Exception as e:  # they expire by themselves
            log.warning("releasing session leases failed", extra={"error": str(e)})

    async def hand_over_all(self) -> None:
        """Graceful stop: expire every lease now so the survivors adopt the sessions at once."""
        epochs = self.forget(list(self.owned))
        try:
            async with self.db.connection() as conn:
                await leases.hand_over(conn, SESSION_SCOPE, self.holder, epochs)
        except Exception as e:
            log.warning("handing sessions over failed (they expire by themselves)", extra={"error": str(e)})

    # --- loops ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._tasks = [
            asyncio.ensure_future(self._renew_loop()),
            asyncio.ensure_future(self._takeover_loop()),
            asyncio.ensure_future(self._watchdog()),
        ]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _renew_loop(self) -> None:
        ttl = self.settings.ttl
        while True:
            await asyncio.sleep(ttl / 3)
            started = time.monotonic()
            try:
                async with asyncio.timeout(ttl / 3):
                    async with self.db.connection() as conn:
                        held = await leases.renew(conn, SESSION_SCOPE, self.holder, ttl)
            except Exception as e:
                log.warning("renewing session leases failed", extra={"error": str(e) or type(e).__name__})
                continue
            self._renewed = started
            lost = [
                k for k, e in self.owned.items()
                if held.get(k) != e and self._claimed_at.get(k, 0.0) < started
            ]  # fmt: skip
            if lost:
                log.warning("session leases taken over; stepping down", extra={"sessions": lost[:20]})
                self.step_down(lost, "lease taken over")
            if self.heartbeat is not None:
                await self._beat(self.heartbeat)

    async def _beat(self, heartbeat: Heartbeat) -> None:
        """The replica's heartbeat row, after the renewal and outside its deadline (it never delays one)."""
        try:
            async with asyncio.timeout(self.settings.ttl / 3):
                async with self.db.connection() as conn:
                    await heartbeat(conn)
        except Exception as e:  # a missed heartbeat never costs a renewal
            log.warning("replica heartbeat failed", extra={"error": str(e) or type(e).__name__})

    async def _watchdog(self) -> None:
        """Step down from everything once renewals have failed for 0.7 × the lease: before the leases
        can expire and another replica adopt the sessions, this one stops its agent calls."""
        ttl = self.settings.ttl
        while True:
            await asyncio.sleep(ttl / 10)
            cutoff = time.monotonic() - 0.7 * ttl
            if self._renewed >= cutoff:
                continue
            stale = [k for k in self.owned if self._claimed_at.get(k, 0.0) < cutoff]
            if stale:
                log.error("cannot renew session leases; stepping down", extra={"sessions": len(stale)})
                self.step_down(stale, "lease renewal failed")

    async def _takeover_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.takeover_seconds * (0.75 + random.random() / 2))
            if self.adopt is None:
                continue
            try:
                async with self.db.connection() as conn:
                    found = await leases.expired(conn, SESSION_SCOPE, limit=200, or_holder=self.holder)
            except Exception as e:
                log.warning("looking for expired session leases failed", extra={"error": str(e)})
                continue
            random.shuffle(found)
            for lease in found:
                if lease.name in self.owned:
                    continue
                try:
                    await self.adopt(lease.name)
                except NotOwner:
                    continue  # another survivor was faster
                except Exception as e:
                    log.warning("adopting a session failed", extra={"session": lease.name, "error": str(e)})
