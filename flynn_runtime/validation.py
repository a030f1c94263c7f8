"""Request validation that collects every violated field before refusing (INVALID_ARGUMENT)."""

from __future__ import annotations

import re
from collections.abc import Iterable

from flynn_runtime.errors import FieldViolation, FlynnError, invalid_fields

_ID_RE = re.compile(r"^[A-Za-z0-9._:@/+=-]+$")


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
