"""Structured JSON logs on stderr, one object per line (with trace_id and span_id when tracing is on)."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from flynn_runtime import tracing

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if tracing.ENABLED:
            audit = getattr(record, "audit", None)  # an audit record's line: the ids it already has
            if isinstance(audit, dict) and "trace_id" in audit:
                out["trace_id"], out["span_id"] = audit["trace_id"], audit.get("span_id", "")
            else:
                ids = tracing.current_ids()
                if ids is not None:
                    out["trace_id"], out["span_id"] = ids
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def configure(service: str, level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
