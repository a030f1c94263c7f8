"""One config replica's copy of the principals, kept in step with the store whoever changed it.

The store is the truth. This replica's own changes are applied right after their COMMIT (`refresh`
from the servicer). Changes committed through another replica (PostgreSQL) arrive as a wake-up: the
trigger on `principals_head` NOTIFYs `flynn_config_principals`, heard by the config service's one
LISTEN connection (flynn_runtime/pg_listen.py, which also calls `wake` on every safety poll, so a
lost notification costs at most one poll interval) and handled by the same `Follower` loop as the
revision feed (config_svc/revision_feed.py). A wake-up reads the version (one small query) and
loads everything only when it moved; `on_change` then gets the new set (the servicer applies it to
this process's authenticator, which ends a revoked credential's streams, and pushes it to every
WatchPrincipals stream). A set older than the one applied is never published. Plain domain code:
no gRPC.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from config_svc.principal_store import PrincipalSet, PrincipalStore
from flynn_runtime.pg_listen import Follower


class PrincipalCache:
    def __init__(self, store: PrincipalStore, on_change: Callable[[PrincipalSet], None]) -> None:
        self.store = store
        self.on_change = on_change
        self.current = PrincipalSet(version=-1)
        self.loads = 0
        self._lock = asyncio.Lock()
        self._follower = Follower("config-principal-cache", self.refresh)

    async def refresh(self) -> PrincipalSet:
        """Publish the store's principals if they changed since the last publication."""
        async with self._lock:
            if await self.store.version() == self.current.version:
                return self.current
            loaded = await self.store.load()
            self.loads += 1
            if loaded.version > self.current.version:
                self.current = loaded
                self.on_change(loaded)
            return self.current

    def wake(self) -> None:
        self._follower.wake()

    def start(self) -> None:
        self._follower.start()

    async def stop(self) -> None:
        await self._follower.stop()
