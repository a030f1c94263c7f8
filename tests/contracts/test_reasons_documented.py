"""Every ErrorInfo reason the services can answer is in PROTOCOL.md's one table of reasons, spelled
the same (so a client can branch on what the page says)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("flynn_runtime", "config_svc", "queue_svc", "reactions_svc", "nodes_svc", "voice_svc", "gateway")
# Helpers of flynn_runtime/errors.py and where their reason goes (keyword `reason`, or this positional).
HELPERS = {
    "FlynnError": 2,
    "invalid_argument": 2,
    "invalid_fields": 1,
    "not_found": 2,
    "failed_precondition": 1,
    "unavailable": 1,
    "permission_denied": 1,
    "unauthenticated": 1,
    "resource_exhausted": 1,
}
# The helpers' defaults (errors.py), answered whenever a call passes no reason.
DEFAULTS = {
    "invalid_argument": "INVALID_FIELD",
    "invalid_fields": "INVALID_FIELD",
    "not_found": "NOT_FOUND",
    "unavailable": "UNAVAILABLE",
    "permission_denied": "PERMISSION_DENIED",
    "unauthenticated": "UNAUTHENTICATED",
}


def answered_reasons() -> set[str]:
    found: set[str] = set()
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not isinstance(node, ast.Call):
                    continue
                func = node.func
                if isinstance(func, ast.Attribute) and not (
                    isinstance(func.value, ast.Name) and func.value.id == "errors"
                ):
                    continue  # a method of some object (db.unavailable(e)), not the errors helper
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if name not in HELPERS:
                    continue
                reason: ast.expr | None = next((k.value for k in node.keywords if k.arg == "reason"), None)
                if reason is None and len(node.args) > HELPERS[name]:
                    reason = node.args[HELPERS[name]]
                if isinstance(reason, ast.Constant) and isinstance(reason.value, str):
                    found.add(reason.value)
                elif reason is None and name in DEFAULTS and path.name != "errors.py":
                    found.add(DEFAULTS[name])
    return found


def documented_reasons() -> set[str]:
    text = (ROOT / "docs" / "api" / "PROTOCOL.md").read_text(encoding="utf-8")
    table = text[text.index("### Reasons") : text.index("### Codes")]
    return {
        r
        for line in table.splitlines()
        if line.startswith("| `")
        for r in re.findall(r"`([A-Z][A-Z_]+)`", line.split("|")[1])
    }


def test_every_answered_reason_is_documented() -> None:
    answered = answered_reasons()
    assert {"INVALID_FIELD", "NOT_FOUND", "SHUTTING_DOWN", "NOT_DEPLOYED"} <= answered  # the scan sees them
    missing = answered - documented_reasons()
    assert not missing, f"reasons answered but not in PROTOCOL.md's table: {sorted(missing)}"
