"""Keeps one replica's head and watchers in step with the revision table, whoever committed.

With several config replicas on one PostgreSQL database, a revision can be committed through any of
them. Every replica publishes revisions to its own watchers strictly in order and without gaps:

- a revision this replica committed itself is published at once (`committed`, no round trip) when it
  is the next one; otherwise the feed catches up first;
- a revision committed elsewhere arrives as a NOTIFY wake-up (flynn_runtime/pg_listen.py, channel
  flynn_config_revision, sent by a trigger at COMMIT) or at the latest on the periodic safety poll;
  the feed then reads `revisions > applied` from the table, which is the truth (the notification's
  payload is never used), and publishes them in order.

Revision numbers are contiguous (the head row's lock orders writers, so a later revision never
commits before an earlier one), so "applied + 1" is always the next thing to publish. Plain domain
code: no gRPC.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from config_svc.config_editor import ConfigEditor
from config_svc.revision_store import StoredRevision
from flynn_runtime.pg_listen import Follower

BATCH = 256


class RevisionFeed:
    def __init__(self, editor: ConfigEditor, publish: Callable[[StoredRevision], None]) -> None:
        self.editor = editor
        self.publish = publish
        self.applied = editor.head_revision
        self.catch_ups = 0
        self._lock = asyncio.Lock()
        self._follower = Follower("config-revision-feed", self.catch_up)

    def committed(self, s: StoredRevision) -> None:
        """This replica committed `s` (called right after COMMIT, before anything else awaits)."""
        if s.revision == self.applied + 1:
            self._apply(s)
        elif s.revision > self.applied:
            self.wake()  # others committed in between and we have not read them yet

    def wake(self) -> None:
        self._follower.wake()

    async def catch_up(self) -> None:
        """Publish every revision after `applied`, in order, reading the table."""
        async with self._lock:
            self.catch_ups += 1
            while True:
                rows = await self.editor.store.range(self.applied, 2**62, BATCH)
                for s in rows:
                    if s.revision == self.applied + 1:
                        self._apply(s)
                if len(rows) < BATCH:
                    return

    def _apply(self, s: StoredRevision) -> None:
        self.editor.adopt(s)
        self.publish(s)
        self.applied = s.revision

    def start(self) -> None:
        self._follower.start()

    async def stop(self) -> None:
        await self._follower.stop()
