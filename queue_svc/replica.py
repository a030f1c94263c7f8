"""Run control as one of N replicas on PostgreSQL: which sessions this replica serves, and how it
takes them on and gives them up (the lease bookkeeping and its loops are ownership.py's).

- A call about a session this replica does not own first tries to adopt it (`own`): acquire the
  lease (free, released, or expired), then load the session's state from the store: its runs that
  were active under the previous owner are recovered with the restart policy, its queue moves on,
  its replies left pending go out as text. When another live replica holds the lease, NotOwner
  names it and the servicer forwards the call there (forwarding.py).
- The takeover loop adopts the sessions of replicas whose leases expired (they died or froze), so
  their runs are recovered without waiting for a call.
- Stepping down (lease lost, or a batch refused because its epoch is stale) drops the session from
  memory and stops its agent calls without writing anything; the new owner recovers them.
- Streams: every replica publishes what any replica committed, in database order (tail.py), and
  acknowledges only its own commits (group_commit.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from flynn_runtime import leases
from flynn_runtime.leases import StaleEpoch
from queue_svc import metrics
from queue_svc.agents import AgentInput
from queue_svc.ledger import ACTIVE, CANCEL_REQUESTED, COLLECT, QUEUED, STARTED, _Entry, _Live
from queue_svc.ownership import NotOwner, Ownership
from queue_svc.store_pg import SESSION_SCOPE, PgQueueStore
from queue_svc.tail import Tailer

if TYPE_CHECKING:
    from queue_svc.run_control import RunControl

log = logging.getLogger(__name__)


class Replica:
    def __init__(self, rc: RunControl, ownership: Ownership) -> None:
        assert isinstance(rc.store, PgQueueStore), "replicas need the PostgreSQL store"
        self.rc = rc
        self.store: PgQueueStore = rc.store
        self.ownership = ownership
        self.tailer = Tailer(rc.store, rc.events, rc.replies)

    async def start(self) -> None:
        """Sessions are adopted on demand (a call, or an expired lease of a dead replica), never all at
        start-up; only the busy ones nobody holds (data from before replicas, imported, or handed over
        by this replica's previous incarnation) are adopted now."""
        rc, own, tailer = self.rc, self.ownership, self.tailer
        rc.store.epoch_of = own.epoch_of
        rc.commit.publish_locally = False
        rc.commit.on_commit = tailer.publish_own
        rc.commit.on_refused = self.refused
        own.step_down = self.step_down
        own.adopt = self.adopt
        tailer.progress = rc.commit.advance
        metrics.QUEUE_DEPTH.set_function(lambda: rc._depth)
        metrics.RUNS_ACTIVE.set_function(lambda: sum(1 for r in rc._runs.values() if r.row.state in ACTIVE))
        await tailer.start()
        own.start()
        keys = [r.session_key for r in await rc.store.busy_sessions()]
        keys += [r.session_key for r in await rc.store.pending_speech()]
        for key in dict.fromkeys(keys):
            with contextlib.suppress(NotOwner):
                await self.adopt(key)
        await rc.durable()

    async def stop(self) -> None:
        """Graceful stop: hand every session over (expired now) so the survivors adopt them at once."""
        await self.ownership.stop()
        await self.ownership.hand_over_all()
        await self.tailer.stop()

    def owns(self, key: str) -> bool:
        return key in self.ownership.owned

    async def own(self, key: str) -> None:
        """Make sure this replica owns `key` (adopting it when free); NotOwner names the owner."""
        own = self.ownership
        if key in own.owned and not own.adopting(key):
            return
        hint = own.owner_hint(key)
        if hint is not None and not own.adopting(key):
            raise hint  # another live replica owns it (read less than a lease ago): forward at once
        self.rc.store.check_writable()  # the database is away: say so now, not after a pool timeout
        await self.adopt(key)  # also waits for an adoption in progress (the takeover loop's)

    async def adopt(self, key: str) -> None:
        """Acquire the session's lease and load its state (see the module docstring)."""
        own = self.ownership
        try:
            await self._adopt(key)
        finally:
            if key not in own.owned:
                own.drop_lock(key)  # a lock per session this replica was merely asked about: not kept

    async def _adopt(self, key: str) -> None:
        own, rc = self.ownership, self.rc
        async with own.lock(key):
            if key in own.owned:
                return
            lease = await own.acquire(key)
            if not lease.held_by(own.holder):
                raise NotOwner(key, lease.address, lease.expires_in)
            try:
                with rc._pin(key):
                    self._drop(key)
                    await self._load(key)
            except BaseException:
                self.step_down([key], "loading the session failed")
                raise
            metrics.SESSIONS_ADOPTED.inc()

    async def _load(self, key: str) -> None:
        rc, store = self.rc, self.store
        # The row and whether there is anything to recover, read at once (two index probes, one wait).
        row, busy = await asyncio.gather(store.session(key), store.session_busy(key))
        if row is None:
            return  # a new session: created by the operation that follows
        if not busy:
            # An idle session (the common case): in memory as stored. Nothing to recover, so nothing
            # to write: a read of it (GetSession) must not cost a commit.
            rc._session_from(row)
            return
        runs = await store.runs_in_states((QUEUED, STARTED, CANCEL_REQUESTED), key)
        entries = await store.queue_entries(key)
        pending = await store.pending_speech(key)
        collected = {e.message_id: await rc.store.message(e.message_id) for e in entries if e.kind != "run"}
        s = rc._session_from(row)
        for r in runs:
            rc._runs[r.run_id] = _Live(r)
        for e in entries:
            if e.kind == "run":
                live = rc._runs.get(e.run_id)
                if live is not None:
                    s.queue.append(
                        _Entry(e.pos, "run", e.run_id, receive_time=live.row.create_time, mode=live.row.mode)
                    )
                    rc._depth += 1
                continue
            m = collected.get(e.message_id)
            if m is not None:
                s.queue.append(
                    _Entry(e.pos, "collect", message=AgentInput(m.message_id, m.sender, m.text, m.causation),
                           receive_time=m.receive_time, mode=COLLECT)
                )  # fmt: skip
                s.last_collect = max(s.last_collect, m.receive_time)
                rc._depth += 1
        with rc._op() as op:
            op.sessions[key] = s
            for live in [rc._runs[r.run_id] for r in runs if r.state in ACTIVE]:
                rc._recover_run(op, live)
            rc._advance(op, s)
            rc.outbox.recover(op, pending)

    def step_down(self, keys: list[str], why: str) -> None:
        """Stop serving these sessions here: forget their leases, drop their state from memory, stop
        their agent calls without writing anything (the new owner recovers their runs)."""
        self.ownership.forget(keys)
        for key in keys:
            self._drop(key)
        metrics.SESSIONS_STEPPED_DOWN.labels(why).inc(len(keys))
        log.warning(
            "stepped down from sessions", extra={"count": len(keys), "why": why, "sessions": keys[:10]}
        )

    def _drop(self, key: str) -> None:
        rc = self.rc
        s = rc._sessions.pop(key, None)
        if s is not None:
            if s.timer is not None:
                s.timer.cancel()
            rc._depth -= len(s.queue)
        lives = [live for live in rc._runs.values() if live.row.session_key == key]
        rc.driver.stop(lives)
        for live in lives:
            rc._runs.pop(live.row.run_id, None)

    def refused(self, e: StaleEpoch, sessions: set[str]) -> None:
        """A batch was refused (stale epoch). Every session it touched has memory ahead of the
        database now: step down from them; the ones still ours are handed over (expired at once) so
        a replica (maybe this one) adopts them from the database."""
        own = self.ownership
        mine = [k for k in sessions if k in own.owned and own.owned[k] == e.epochs.get(k, own.owned[k])]
        still = {k: own.owned[k] for k in mine if k not in e.names}
        self.step_down(mine, "write refused: stale epoch")
        if still:
            asyncio.ensure_future(self._hand_over(still))

    async def _hand_over(self, epochs: dict[str, int]) -> None:
        try:
            async with self.ownership.db.connection() as conn:
                await leases.hand_over(conn, SESSION_SCOPE, self.ownership.holder, epochs)
        except Exception as ex:
            log.warning("handing sessions over failed (they expire by themselves)", extra={"error": str(ex)})

    async def release(self, keys: list[str]) -> None:
        """Idle sessions left memory: free their leases, so the next call anywhere acquires anew."""
        await self.ownership.release(self.ownership.forget(keys))
