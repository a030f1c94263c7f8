"""Append-only audit log: one JSON object per line under <data_dir>/audit/<service>.jsonl, and to the log.

With tracing on, a record made while a span is current carries its trace_id and span_id.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from flynn_runtime import tracing
from flynn_runtime.auth import actor as current_actor

log = logging.getLogger("audit")


class AuditLog:
    def __init__(self, data_dir: Path | None, service: str) -> None:
        self.service = service
        self._lock = threading.Lock()
        self.path: Path | None = None
        self._fh = None
        if data_dir is not None:
            self.path = data_dir / "audit" / f"{service}.jsonl"
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = self.path.open("a", encoding="utf-8", buffering=1)

    def record(self, event: str, *, actor: str | None = None, **fields: Any) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
            + f".{int(time.time() * 1000) % 1000:03d}Z",
            "service": self.service,
            "event": event,
            "actor": actor if actor is not None else current_actor(),
        }
        entry.update({k: v for k, v in fields.items() if v is not None})
        if tracing.ENABLED and "trace_id" not in entry:
            ids = tracing.current_ids()
            if ids is not None:
                entry["trace_id"], entry["span_id"] = ids
        line = json.dumps(entry, default=str, ensure_ascii=False)
        with self._lock:
            if self._fh is not None:
                self._fh.write(line + "\n")
        log.info(event, extra={"audit": entry})
        return entry

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None


def read_audit(path: Path) -> list[dict[str, Any]]:
    """Every record of an audit file (tests and the CLI use it)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
