"""Short names of protobuf enum values: QUEUE_MODE_INTERRUPT -> "interrupt".

Every Flynn enum's zero value is <PREFIX>UNSPECIFIED, so the prefix is read from it. Used for metric
labels, audit fields, span attributes, CLI and console text: one rule, one place.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from google.protobuf.descriptor import EnumDescriptor


def _descriptor(enum: Any) -> EnumDescriptor:
    desc = getattr(enum, "DESCRIPTOR", enum)
    assert isinstance(desc, EnumDescriptor)
    return desc


def enum_prefix(enum: Any) -> str:
    """The prefix of the enum's value names ("QUEUE_MODE_"), read from its zero value."""
    return _prefix(_descriptor(enum))


@cache
def _prefix(desc: EnumDescriptor) -> str:
    zero = desc.values_by_number.get(0)
    if zero is not None and zero.name.endswith("UNSPECIFIED"):
        return str(zero.name)[: -len("UNSPECIFIED")]
    return ""


def short_name(enum: Any, number: int, *, lower: bool = True) -> str:
    """The value's name without the enum's prefix (lower case unless `lower=False`); digits if unknown."""
    desc = _descriptor(enum)
    v = desc.values_by_number.get(number)
    if v is None:
        return str(number)
    name = str(v.name).removeprefix(_prefix(desc))
    return name.lower() if lower else name


def short_names(enum: Any, *, with_zero: bool = True) -> dict[int, str]:
    """{number: short name} of every value of the enum (the zero value left out unless `with_zero`)."""
    desc = _descriptor(enum)
    return {v.number: short_name(desc, v.number) for v in desc.values if with_zero or v.number != 0}
