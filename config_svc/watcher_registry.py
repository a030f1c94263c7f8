"""In-memory registry of the service instances watching the config (what ListWatchers shows). Bounded.

With several config replicas on PostgreSQL each replica's registry is also written to a shared table
(config_svc/watcher_table.py): `dirty` names the entries changed since the last write.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class WatcherEntry:
    service: str
    instance_id: str
    version: str = ""
    streams: int = 0
    applied_revision: int = 0
    last_nack_revision: int = 0
    last_nack_reason: str = ""
    last_seen: float = 0.0
    peer: str = ""

    @property
    def connected(self) -> bool:
        return self.streams > 0


class WatcherRegistry:
    def __init__(self, max_entries: int = 10_000) -> None:
        self.max_entries = max_entries
        self._entries: dict[tuple[str, str], WatcherEntry] = {}
        self.dirty: set[tuple[str, str]] = set()

    def _entry(self, service: str, instance_id: str, version: str) -> WatcherEntry:
        key = (service, instance_id)
        e = self._entries.get(key)
        if e is None:
            if len(self._entries) >= self.max_entries:
                self._evict()
            e = self._entries[key] = WatcherEntry(service, instance_id)
        if version:
            e.version = version
        e.last_seen = time.time()
        self.dirty.add(key)
        return e

    def _evict(self) -> None:
        idle = [e for e in self._entries.values() if not e.connected] or list(self._entries.values())
        oldest = min(idle, key=lambda e: e.last_seen)
        self._entries.pop((oldest.service, oldest.instance_id), None)

    def opened(self, service: str, instance_id: str, version: str, peer: str) -> WatcherEntry:
        e = self._entry(service, instance_id, version)
        e.streams += 1
        e.peer = peer
        return e

    def closed(self, service: str, instance_id: str) -> None:
        e = self._entries.get((service, instance_id))
        if e is not None:
            e.streams = max(0, e.streams - 1)
            e.last_seen = time.time()
            self.dirty.add((service, instance_id))

    def report(
        self, service: str, instance_id: str, version: str, applied: int, nack_revision: int, nack_reason: str
    ) -> WatcherEntry:
        e = self._entry(service, instance_id, version)
        if applied:
            e.applied_revision = applied
        if nack_revision:
            e.last_nack_revision, e.last_nack_reason = nack_revision, nack_reason
        return e

    def take_dirty(self) -> list[WatcherEntry]:
        keys, self.dirty = self.dirty, set()
        return [e for k in keys if (e := self._entries.get(k)) is not None]

    def sorted(self) -> list[WatcherEntry]:
        return sorted(self._entries.values(), key=lambda e: (e.service, e.instance_id))

    def __len__(self) -> int:
        return len(self._entries)
