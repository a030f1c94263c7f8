"""Storage of the nodes service: node identities, token hashes, registrations and the node event log.

The interface (`NodeStore`) and the backend chosen by settings: node_store_sqlite.py (embedded
default, <data_dir>/nodes/nodes.sqlite) or node_store_pg.py (PostgreSQL schema flynn_nodes, which
also holds the canvas tables of canvas_store_pg.py). Writes return after their commit.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias

from flynn.v1 import nodes_pb2

from flynn_runtime.server import Runtime

SCHEMA = "flynn_nodes"


class EpochConflict(Exception):
    """Another replica registered the node meanwhile (its epoch moved): re-read and register again."""

    def __init__(self, node_id: str, epoch: int) -> None:
        super().__init__(f"node {node_id} is at epoch {epoch} already")
        self.node_id = node_id
        self.epoch = epoch


@dataclass(frozen=True)
class TokenRecord:
    token_id: str
    sha256: str
    node_id: str
    role: str
    description: str
    created: float
    revoked: float | None


@dataclass
class NodeRecord:
    node_id: str
    role: str
    capabilities: list[str]
    epoch: int
    online: bool
    last_seen: float
    connect_time: float
    reconnect_count: int
    protocol_version: int
    display_name: str
    platform: str
    offline_reason: str = ""
    token_id: str = ""


EventType: TypeAlias = nodes_pb2.NodeEventType.ValueType
DISCONNECTED = nodes_pb2.NODE_EVENT_TYPE_DISCONNECTED

# The columns of an events row, in the order `event_record` reads them.
EVENT_COLS = "seq, type, node_id, role, epoch, reason, artifact_name, time"


@dataclass(frozen=True)
class EventRecord:
    seq: int
    type: EventType
    node_id: str
    role: str
    epoch: int
    reason: str
    artifact_name: str
    time: float


@dataclass(frozen=True)
class NewEvent:
    type: EventType
    node_id: str = ""
    role: str = ""
    epoch: int = 0
    reason: str = ""
    artifact_name: str = ""
    time: float = field(default_factory=time.time)


class NodeStore(Protocol):
    async def close(self) -> None: ...

    async def insert_token(self, rec: TokenRecord) -> None: ...

    async def revoke_token(self, token_id: str, reason: str, when: float) -> TokenRecord | None:
        """Revoke; returns the record as it was before (None when unknown)."""
        ...

    async def all_tokens(self) -> list[TokenRecord]: ...

    async def get_token(self, sha256: str) -> TokenRecord | None:
        """The token with this hash (replicas sharing a database read tokens issued elsewhere)."""
        ...

    async def get_node(self, node_id: str) -> NodeRecord | None: ...

    async def list_nodes(self, after: str, limit: int, online: bool | None) -> list[NodeRecord]: ...

    async def node_ids(self) -> set[str]: ...

    async def save_registration(self, rec: NodeRecord, event: NewEvent) -> int:
        """Upsert the node row and append its event in one transaction; returns the event seq."""
        ...

    async def mark_offline(
        self, node_id: str, epoch: int, reason: str, last_seen: float, event: NewEvent | None
    ) -> int:
        """Mark a node offline if it is still at `epoch`; returns the event seq (0 when none was written)."""
        ...

    async def mark_all_offline(self, reason: str) -> list[NodeRecord]: ...

    async def touch_many(self, seen: Iterable[tuple[str, float]]) -> None: ...

    async def append_event(self, e: NewEvent) -> int: ...

    async def events_after(self, after_seq: int, limit: int) -> list[EventRecord]: ...

    async def last_seq(self) -> int: ...

    async def prune_events(self, keep: int) -> int: ...


async def open_node_store(runtime: Runtime) -> NodeStore:
    if runtime.database_settings is None:
        from nodes_svc.node_store_sqlite import SqliteNodeStore

        return SqliteNodeStore(runtime.settings.data_dir / "nodes" / "nodes.sqlite")
    from nodes_svc.node_store_pg import MIGRATIONS, PgNodeStore

    return PgNodeStore(await runtime.open_database(SCHEMA, MIGRATIONS))


def event_record(r: Sequence[Any]) -> EventRecord:
    """An events row (columns EVENT_COLS) of either backend."""
    return EventRecord(
        int(r[0]), EventType(int(r[1])), str(r[2]), str(r[3]), int(r[4]), str(r[5]), str(r[6]), float(r[7])
    )


def node_params(rec: NodeRecord) -> tuple[object, ...]:
    """The values of a nodes row in the order of the stores' column list (capabilities as JSON)."""
    return (
        rec.node_id,
        rec.role,
        json.dumps(rec.capabilities),
        rec.epoch,
        rec.online,
        rec.last_seen,
        rec.connect_time,
        rec.reconnect_count,
        rec.protocol_version,
        rec.display_name,
        rec.platform,
        rec.offline_reason,
        rec.token_id,
    )
