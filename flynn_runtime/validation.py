"""Request validation that collects every violated field before refusing (INVALID_ARGUMENT)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from flynn_runtime.errors import FieldViolation, FlynnError, invalid_fields, shown

_ID_RE = re.compile(r"^[A-Za-z0-9._:@/+=-]+$")

# The longest identifier (rule, run, session, node, engine, service, event, artifact id …) any request
# may carry. Checked before any lookup, so an error never echoes more than errors.shown() allows.
MAX_ID_CHARS = 256
# The most entries a repeated identifier field (engines, services …) may carry.
MAX_ID_LIST = 64


class Violations:
    """Accumulates field violations; `raise_if_any` refuses the request naming all of them."""

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field_path: str, description: str) -> None:
        self.items.append(FieldViolation(field_path, description))

    def check(self, ok: bool, field_path: str, description: str) -> bool:
        if not ok:
            self.add(field_path, description)
        return ok

    def extend(self, items: Iterable[FieldViolation]) -> None:
        self.items.extend(items)

    def __bool__(self) -> bool:
        return bool(self.items)

    def error(self) -> FlynnError:
        return invalid_fields(self.items)

    def raise_if_any(self) -> None:
        if self.items:
            raise self.error()

    # Common checks -------------------------------------------------------------------------

    def text(
        self,
        field_path: str,
        value: str,
        *,
        required: bool = False,
        max_bytes: int = 1024,
        min_len: int = 0,
    ) -> bool:
        if required and not value:
            self.add(field_path, "is required")
            return False
        if len(value) < min_len:
            self.add(field_path, f"must be at least {min_len} characters")
            return False
        size = len(value.encode("utf-8", "surrogatepass"))
        if size > max_bytes:
            self.add(field_path, f"is {size} bytes; at most {max_bytes} allowed")
            return False
        if "\x00" in value:
            self.add(field_path, "must not contain NUL characters")
            return False
        return True

    def identifier(self, field_path: str, value: str, *, required: bool = True, max_len: int = 256) -> bool:
        if not value:
            if required:
                self.add(field_path, "is required")
            return not required
        if len(value) > max_len:
            self.add(field_path, f"is {len(value)} characters; at most {max_len} allowed")
            return False
        if not _ID_RE.match(value):
            self.add(field_path, "may contain only letters, digits and . _ : @ / + = -")
            return False
        return True

    def id_length(self, field_path: str, value: str, *, max_len: int = MAX_ID_CHARS) -> bool:
        """The one length bound of an identifier that is looked up, not parsed (a miss is NOT_FOUND)."""
        return self.check(
            len(value) <= max_len, field_path, f"is {len(value)} characters; at most {max_len} allowed"
        )

    def id_list(
        self,
        field_path: str,
        values: Sequence[str],
        known: Sequence[str] | None = None,
        *,
        max_items: int = MAX_ID_LIST,
        max_len: int = MAX_ID_CHARS,
    ) -> bool:
        """A repeated identifier field: bounded in count and length, and (when `known` is given)
        every entry one of `known`. Values are echoed cut to errors.shown()."""
        if len(values) > max_items:
            self.add(field_path, f"has {len(values)} entries; at most {max_items} allowed")
            return False
        ok = True
        for i, value in enumerate(values):
            if len(value) > max_len:
                self.add(f"{field_path}[{i}]", f"is {len(value)} characters; at most {max_len} allowed")
                ok = False
            elif known is not None and value not in known:
                self.add(f"{field_path}[{i}]", f"unknown value {shown(value)!r}; known: {', '.join(known)}")
                ok = False
        return ok

    def int_range(self, field_path: str, value: int, lo: int, hi: int) -> bool:
        return self.check(lo <= value <= hi, field_path, f"must be between {lo} and {hi}, got {value}")

    def enum_known(
        self, field_path: str, value: int, known: Iterable[int], *, allow_zero: bool = True
    ) -> bool:
        allowed = set(known)
        if value == 0 and allow_zero:
            return True
        return self.check(value in allowed and value != 0, field_path, f"unknown value {value}")


def page_size(value: int, field_path: str = "page_size", default: int = 50, maximum: int = 500) -> int:
    """Resolve a page size: 0 means default; outside 0..maximum is INVALID_ARGUMENT."""
    if value < 0 or value > maximum:
        raise invalid_fields([FieldViolation(field_path, f"must be between 0 and {maximum}, got {value}")])
    return value or default
