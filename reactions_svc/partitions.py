"""Event partitions divided among reactions replicas on one PostgreSQL database (not used with SQLite).

Every event belongs to one of `count` partitions: the rollout bucket function (salt
"reactions-partition") of its session key (run events) or node id (node events), so all events of a
session are evaluated by one replica, in order, and session-keyed cooldowns stay exact.

- **Ownership.** Partition `p` is a lease (flynn_runtime/leases.py, scope "partition", name "p<n>")
  with a fencing epoch. Each replica also holds a liveness lease (scope "replica"). Every `ttl / 3`
  a replica renews what it holds and rebalances toward its fair share, ceil(count / live replicas):
  above it, it releases its highest partitions (a newcomer takes them on its next round); below it,
  it acquires free or expired ones (a dead replica's, once its lease expired).
- **Cursors.** Each (stream, partition) has its own cursor row ("run_events/p3"), written after the
  event is handled, in a transaction whose first statement is the fence: a replica that lost the
  partition (paused, partitioned) has its cursor write refused and stops acting on it.
- **Exactly once.** An event is evaluated once: evaluations are keyed by event id in the database,
  so a new owner re-reading an event the old one evaluated resumes it instead (pending actions
  only, skipping those with a recorded result); actions carry idempotency keys the downstream
  deduplicates (run control's PostReply/SubmitMessage), so the at-most-one-event replay after a
  takeover never doubles an action.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable

from flynn_runtime import leases, rollout
from flynn_runtime.database import Database
from flynn_runtime.errors import FlynnError
from flynn_runtime.fencing import Fencer
from flynn_runtime.replica_registry import Heartbeat
from flynn_runtime.tasks import cancel_and_wait
from reactions_svc import metrics

log = logging.getLogger(__name__)

SCOPE = "partition"
REPLICA_SCOPE = "replica"
SALT = "reactions-partition"
DEFAULT_COUNT = 16
DEFAULT_TTL = 5.0


def partition_of(key: str, count: int) -> int:
    return rollout.bucket(SALT, key) * count // rollout.BASIS_POINTS_MAX


def partition_name(p: int) -> str:
    return f"p{p}"


class PartitionOwner:
    """Which partitions this replica holds, at which epoch; kept fair by `balance`."""

    def __init__(
        self,
        db: Database,
        replica_id: str,
        address: str,
        count: int = DEFAULT_COUNT,
        ttl: float = DEFAULT_TTL,
        on_change: Callable[[set[int], set[int]], None] | None = None,
    ) -> None:
        if count < 1:
            raise ValueError("partition count must be at least 1")
        self.db = db
        self.replica_id = replica_id
        self.address = address
        self.count = count
        self.ttl = ttl
        self.on_change = on_change
        self.held: dict[int, int] = {}  # partition -> epoch
        self.fencer = Fencer("reactions", replica_id)
        self.lease_ok = False
        self.balanced = asyncio.Event()  # set after the first successful round
        #: Called with the connection at the end of each round (the replica's heartbeat row).
        self.heartbeat: Heartbeat | None = None
        self._task: asyncio.Task[None] | None = None

    def holds(self, p: int) -> bool:
        return p in self.held

    def epoch(self, p: int) -> int | None:
        return self.held.get(p)

    def dropped(self, p: int) -> None:
        """A fenced write was refused: we lost `p` without noticing; stop acting on it now."""
        metrics.PARTITIONS_FENCED.inc()
        if self.held.pop(p, None) is not None:
            metrics.PARTITIONS_HELD.set(len(self.held))
            log.warning("partition taken over by another replica", extra={"partition": p})
            if self.on_change is not None:
                self.on_change(set(), {p})

    async def balance(self) -> None:
        """One round: renew, compute the fair share, release extras, take free or expired ones."""
        before = set(self.held)
        async with self.db.connection() as c:
            if not self.lease_ok:
                live = await leases.acquire(
                    c, REPLICA_SCOPE, self.replica_id, self.replica_id, self.address, self.ttl
                )
                self.lease_ok = live.held_by(self.replica_id)
            else:
                self.lease_ok = self.replica_id in await leases.renew(
                    c, REPLICA_SCOPE, self.replica_id, self.ttl
                )
            held = await leases.renew(c, SCOPE, self.replica_id, self.ttl)
            self.held = {int(n[1:]): e for n, e in held.items()}
            # A replica whose lease expired may be frozen inside a transaction: end its sessions
            # before taking its partitions, so its row locks cannot block us.
            await self.fencer.end_dead_sessions(c)
            replicas = max(1, len(await leases.held(c, REPLICA_SCOPE)))
            share = math.ceil(self.count / replicas)
            if len(self.held) > share:
                extra = sorted(self.held)[share:]
                await leases.release(
                    c, SCOPE, self.replica_id, {partition_name(p): self.held[p] for p in extra}
                )
                for p in extra:
                    self.held.pop(p, None)
            elif len(self.held) < share and self.lease_ok:
                # Start from a replica-specific offset so that newcomers do not all race for p0.
                start = rollout.bucket(SALT, self.replica_id) * self.count // rollout.BASIS_POINTS_MAX
                for i in range(self.count):
                    if len(self.held) >= share:
                        break
                    p = (start + i) % self.count
                    if p in self.held:
                        continue
                    lease = await leases.acquire(
                        c, SCOPE, partition_name(p), self.replica_id, self.address, self.ttl
                    )
                    if lease.held_by(self.replica_id):
                        self.held[p] = lease.epoch
            if self.heartbeat is not None:
                await self.heartbeat(c)
        after = set(self.held)
        metrics.PARTITIONS_HELD.set(len(after))
        if after != before and self.on_change is not None:
            self.on_change(after - before, before - after)
        self.balanced.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="reactions-partitions")

    async def _run(self) -> None:
        while True:
            try:
                await self.balance()
            except FlynnError as e:
                self.lease_ok = False
                log.warning("partition balance failed", extra={"error": e.message[:200]})
            await asyncio.sleep(self.ttl / 3)

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def leave(self) -> None:
        """Hand every partition over at once (clean shutdown): no one waits for a lease to expire."""
        with contextlib.suppress(FlynnError):
            async with self.db.connection() as c:
                await leases.release(
                    c, SCOPE, self.replica_id, {partition_name(p): e for p, e in self.held.items()}
                )
                lease = await leases.read(c, REPLICA_SCOPE, self.replica_id)
                if lease is not None and lease.held_by(self.replica_id):
                    await leases.release(c, REPLICA_SCOPE, self.replica_id, {self.replica_id: lease.epoch})
        self.held.clear()
        self.lease_ok = False
