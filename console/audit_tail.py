"""A bounded, filterable tail of the audit logs of every service (the *.jsonl files in audit dirs).

Only the last TAIL_BYTES of each file are read, so a long-running mesh never makes the console slow.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TAIL_BYTES = 512 * 1024
MAX_LIMIT = 1000


@dataclass(frozen=True)
class AuditFilter:
    service: str = ""
    event: str = ""
    actor: str = ""
    text: str = ""

    def accepts(self, entry: dict[str, Any]) -> bool:
        if self.service and str(entry.get("service", "")) != self.service:
            return False
        if self.event and self.event.lower() not in str(entry.get("event", "")).lower():
            return False
        if self.actor and self.actor.lower() not in str(entry.get("actor", "")).lower():
            return False
        if self.text and self.text.lower() not in json.dumps(entry, ensure_ascii=False).lower():
            return False
        return True


def default_audit_dirs(data_dir: Path) -> list[Path]:
    """Where the launcher puts them: <mesh data>/<service>/audit, siblings of the console's data dir."""
    parent = data_dir.resolve().parent
    return sorted(p for p in parent.glob("*/audit") if p.is_dir())


def _tail_lines(path: Path, max_bytes: int) -> list[str]:
    with path.open("rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        start = max(size - max_bytes, 0)
        fh.seek(start)
        data = fh.read()
    lines = data.decode("utf-8", errors="replace").splitlines()
    if start > 0 and lines:
        lines = lines[1:]  # the first line is cut
    return lines


def audit_files(dirs: Iterable[Path]) -> list[Path]:
    files: list[Path] = []
    for d in dirs:
        if d.is_file() and d.suffix == ".jsonl":
            files.append(d)
        elif d.is_dir():
            files.extend(sorted(d.glob("*.jsonl")))
    return files


def tail(
    dirs: Iterable[Path], flt: AuditFilter, limit: int = 200, max_bytes: int = TAIL_BYTES
) -> list[dict[str, Any]]:
    """The newest `limit` entries across all files that pass the filter, oldest first."""
    limit = max(1, min(limit, MAX_LIMIT))
    entries: list[dict[str, Any]] = []
    for f in audit_files(dirs):
        try:
            lines = _tail_lines(f, max_bytes)
        except OSError:
            continue
        for line in lines:
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and flt.accepts(entry):
                entry.setdefault("service", f.stem)
                entries.append(entry)
    entries.sort(key=lambda e: str(e.get("time", "")))
    return entries[-limit:]


def services(dirs: Iterable[Path]) -> list[str]:
    return sorted({f.stem for f in audit_files(dirs)})
