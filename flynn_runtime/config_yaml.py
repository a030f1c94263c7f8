"""The one translation between operator YAML (plain dicts) and FlynnConfig, both ways.

Keys are the proto field names, nested or dotted (`server.queue.mode: interrupt` and
`server: {queue: {mode: interrupt}}` are the same). Enums take friendly spellings (`interrupt`,
`old`, `session`, `message_received`, `equals`) as well as their full names; durations take
"2s", "500ms", "1m30s", "250us" or a number of seconds. Parsing collects every problem with its
path (`automation.reactions[2].trigger.event`) instead of stopping at the first one.

Used by the config service (seed file), the CLI (get/set/apply/diff) and tests.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import yaml
from flynn.v1 import config_pb2
from google.protobuf import descriptor as pb_descriptor
from google.protobuf import duration_pb2
from google.protobuf import message as pb_message

from flynn_runtime.enum_names import enum_prefix, short_name
from flynn_runtime.errors import FieldViolation

FD = pb_descriptor.FieldDescriptor
# Descriptor stubs mark nested types Optional; field handling code works on them untyped.
Field = Any

# Top-level sections; `apply` of a whole file replaces exactly these.
TOP_LEVEL_PATHS = tuple(f.name for f in config_pb2.FlynnConfig.DESCRIPTOR.fields)


class ConfigParseError(ValueError):
    """A YAML document or value that does not translate into a FlynnConfig; names every bad path."""

    def __init__(self, violations: list[FieldViolation]) -> None:
        self.violations = violations
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))


# --- durations --------------------------------------------------------------------------------

_DURATION_UNITS = {
    "h": 3_600_000_000_000,
    "m": 60_000_000_000,
    "s": 1_000_000_000,
    "ms": 1_000_000,
    "us": 1_000,
    "µs": 1_000,
    "ns": 1,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|m|s|us|µs|ns)")


def parse_duration_ns(value: object) -> int:
    """Nanoseconds of "1m30s" / "500ms" / "2s" / "-1s" / 1.5 (seconds); ValueError when unreadable."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 2s or 500ms")
    if isinstance(value, int | float):
        return round(float(value) * 1e9)
    if not isinstance(value, str):
        raise ValueError("expected a duration such as 2s or 500ms")
    text = value.strip()
    sign = 1
    if text.startswith("-"):
        sign, text = -1, text[1:]
    if text in ("0", ""):
        if text == "":
            raise ValueError("empty duration")
        return 0
    pos, total = 0, 0
    for m in _DURATION_PART.finditer(text):
        if m.start() != pos:
            break
        total += round(float(m.group(1)) * _DURATION_UNITS[m.group(2)])
        pos = m.end()
    if pos != len(text) or pos == 0:
        try:
            return sign * round(float(text) * 1e9)
        except ValueError:
            raise ValueError(f"unreadable duration {value!r} (use e.g. 2s, 500ms, 1m30s)") from None
    return sign * total


def format_duration(d: duration_pb2.Duration) -> str:
    """The shortest exact spelling: 2s, 500ms, 10m, 1h30m, 1m30s."""
    ns = d.seconds * 1_000_000_000 + d.nanos
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    ns = abs(ns)
    if ns % 1_000_000_000 == 0:
        secs = ns // 1_000_000_000
        h, rem = divmod(secs, 3600)
        m, s = divmod(rem, 60)
        parts = [f"{h}h" if h else "", f"{m}m" if m else "", f"{s}s" if s else ""]
        return sign + "".join(parts)
    for unit, size in (("ms", 1_000_000), ("us", 1_000)):
        if ns % size == 0:
            return f"{sign}{ns // size}{unit}"
    return f"{sign}{ns}ns"


def _set_duration(d: duration_pb2.Duration, ns: int) -> None:
    seconds, nanos = divmod(abs(ns), 1_000_000_000)
    if ns < 0:
        seconds, nanos = -seconds, -nanos
    d.seconds, d.nanos = seconds, nanos


# --- enums ------------------------------------------------------------------------------------


def _enum_prefix(enum: Any) -> str:
    return enum_prefix(enum)


def enum_from_text(enum: Any, value: object) -> int:
    """Number of an enum value given as `interrupt`, `QUEUE_MODE_INTERRUPT`, `message-received` or 3."""
    if isinstance(value, bool):
        raise ValueError("expected a name")
    if isinstance(value, int):
        if value in enum.values_by_number:
            return value
        raise ValueError(f"unknown value {value}; expected one of {', '.join(enum_choices(enum))}")
    if not isinstance(value, str):
        raise ValueError(f"expected one of {', '.join(enum_choices(enum))}")
    name = value.strip().upper().replace("-", "_").replace(" ", "_")
    prefix = _enum_prefix(enum)
    for candidate in (name, prefix + name):
        v = enum.values_by_name.get(candidate)
        if v is not None and v.number != 0:
            return int(v.number)
    raise ValueError(f"unknown value {value!r}; expected one of {', '.join(enum_choices(enum))}")


def enum_to_text(enum: Any, number: int) -> str | int:
    if number not in enum.values_by_number:
        return number
    return short_name(enum, number)


def enum_choices(enum: Any) -> list[str]:
    return [str(enum_to_text(enum, v.number)) for v in enum.values if v.number != 0]


# --- dict -> proto ----------------------------------------------------------------------------


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def expand_dotted(
    data: Mapping[str, Any], path: str = "", out: list[FieldViolation] | None = None
) -> dict[str, Any]:
    """`{"server.queue.mode": x}` -> `{"server": {"queue": {"mode": x}}}`, merging with nested keys."""
    result: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key)
        parts = key.split(".")
        node = result
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict):
                if out is not None:
                    out.append(FieldViolation(_join(path, ".".join(parts[: i + 1])), "given twice"))
                break
            node = nxt
        else:
            leaf = parts[-1]
            # Only this level's keys are split: nested levels are expanded when their message is filled,
            # and map keys (session keys may contain dots) never are.
            if isinstance(value, Mapping) and isinstance(node.get(leaf), dict):
                _deep_merge(node[leaf], value, _join(path, key), out)
            elif isinstance(value, Mapping):
                node[leaf] = dict(value)
            elif leaf in node:
                if out is not None:
                    out.append(FieldViolation(_join(path, key), "given twice"))
            else:
                node[leaf] = value
    return result


def _deep_merge(
    into: dict[str, Any], other: Mapping[str, Any], path: str, out: list[FieldViolation] | None
) -> None:
    for k, v in other.items():
        if isinstance(v, Mapping) and isinstance(into.get(k), dict):
            _deep_merge(into[k], v, _join(path, str(k)), out)
        elif k in into:
            if out is not None:
                out.append(FieldViolation(_join(path, k), "given twice"))
        else:
            into[k] = dict(v) if isinstance(v, Mapping) else v


def _scalar(fd: Field, value: object, path: str, out: list[FieldViolation]) -> object | None:
    t = fd.type
    if t == FD.TYPE_ENUM:
        try:
            return enum_from_text(fd.enum_type, value)
        except ValueError as e:
            out.append(FieldViolation(path, str(e)))
            return None
    if t == FD.TYPE_BOOL:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "on", "off", "yes", "no"):
            return value.lower() in ("true", "on", "yes")
        out.append(FieldViolation(path, f"expected true or false, got {value!r}"))
        return None
    if t in (FD.TYPE_INT32, FD.TYPE_INT64, FD.TYPE_UINT32, FD.TYPE_UINT64, FD.TYPE_SINT32, FD.TYPE_SINT64):
        if isinstance(value, bool) or not isinstance(value, int | str):
            out.append(FieldViolation(path, f"expected an integer, got {value!r}"))
            return None
        try:
            n = int(value)
        except ValueError:
            out.append(FieldViolation(path, f"expected an integer, got {value!r}"))
            return None
        limit = 2**31 if t in (FD.TYPE_INT32, FD.TYPE_SINT32) else 2**63
        if not -limit <= n < limit:
            out.append(FieldViolation(path, f"{n} is out of range"))
            return None
        return n
    if t in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            out.append(FieldViolation(path, f"expected a number, got {value!r}"))
            return None
        try:
            return float(value)
        except ValueError:
            out.append(FieldViolation(path, f"expected a number, got {value!r}"))
            return None
    if t == FD.TYPE_STRING:
        if value is None or isinstance(value, dict | list):
            out.append(FieldViolation(path, f"expected text, got {value!r}"))
            return None
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value)
    out.append(FieldViolation(path, "unsupported field type"))
    return None


def _fill_message(msg: pb_message.Message, value: object, path: str, out: list[FieldViolation]) -> None:
    if isinstance(msg, duration_pb2.Duration):
        try:
            _set_duration(msg, parse_duration_ns(value))
        except ValueError as e:
            out.append(FieldViolation(path, str(e)))
        return
    if value is None:
        msg.SetInParent()
        return
    if not isinstance(value, Mapping):
        out.append(FieldViolation(path or "<root>", f"expected a mapping, got {value!r}"))
        return
    data = expand_dotted(value, path, out)
    fields = msg.DESCRIPTOR.fields_by_name
    msg.SetInParent()
    for name, item in data.items():
        fd = fields.get(name)
        p = _join(path, name)
        if fd is None:
            known = ", ".join(sorted(fields))
            out.append(FieldViolation(p, f"unknown field (known here: {known})"))
            continue
        _fill_field(msg, fd, item, p, out)


def _is_map(fd: Field) -> bool:
    return bool(fd.type == FD.TYPE_MESSAGE and fd.message_type.GetOptions().map_entry)


def _fill_field(msg: pb_message.Message, fd: Field, item: object, p: str, out: list[FieldViolation]) -> None:
    container: Any = getattr(msg, fd.name)
    if _is_map(fd):
        if item is None:
            return
        if not isinstance(item, Mapping):
            out.append(FieldViolation(p, "expected a mapping of key: value"))
            return
        vfd = fd.message_type.fields_by_name["value"]
        for k, v in item.items():
            kp = f"{p}[{k}]"
            if vfd.type == FD.TYPE_MESSAGE:
                _fill_message(container[str(k)], v, kp, out)
            else:
                sv = _scalar(vfd, v, kp, out)
                if sv is not None:
                    container[str(k)] = sv
        return
    if fd.is_repeated:
        if item is None:
            return
        if not isinstance(item, list | tuple):
            out.append(FieldViolation(p, "expected a list"))
            return
        for i, v in enumerate(item):
            ip = f"{p}[{i}]"
            if fd.type == FD.TYPE_MESSAGE:
                _fill_message(container.add(), v, ip, out)
            else:
                sv = _scalar(fd, v, ip, out)
                if sv is not None:
                    container.append(sv)
        return
    if fd.type == FD.TYPE_MESSAGE:
        _fill_message(container, item, p, out)
        return
    sv = _scalar(fd, item, p, out)
    if sv is not None:
        setattr(msg, fd.name, sv)


def dict_to_config(data: Mapping[str, Any] | None) -> config_pb2.FlynnConfig:
    """FlynnConfig of a YAML-shaped dict; ConfigParseError naming every bad path."""
    cfg = config_pb2.FlynnConfig()
    out: list[FieldViolation] = []
    if data is not None:
        _fill_message(cfg, data, "", out)
    if out:
        raise ConfigParseError(out)
    return cfg


def yaml_to_config(text: str) -> config_pb2.FlynnConfig:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigParseError([FieldViolation("<yaml>", str(e))]) from None
    if data is not None and not isinstance(data, Mapping):
        raise ConfigParseError([FieldViolation("<yaml>", "the document must be a mapping")])
    return dict_to_config(data)


# --- proto -> dict ----------------------------------------------------------------------------


def _scalar_out(fd: Field, value: Any) -> Any:
    if fd.type == FD.TYPE_ENUM:
        return enum_to_text(fd.enum_type, int(value))
    return value


def message_to_dict(msg: pb_message.Message) -> dict[str, Any]:
    """Set fields only, friendly enums and durations (the inverse of dict_to_config)."""
    out: dict[str, Any] = {}
    for f, value in msg.ListFields():
        fd: Field = f
        out[fd.name] = _value_out(fd, value)
    return out


def _value_out(fd: Field, value: Any) -> Any:
    if _is_map(fd):
        vfd = fd.message_type.fields_by_name["value"]
        return {
            k: (_message_out(v) if vfd.type == FD.TYPE_MESSAGE else _scalar_out(vfd, v))
            for k, v in sorted(value.items())
        }
    if fd.is_repeated:
        if fd.type == FD.TYPE_MESSAGE:
            return [_message_out(v) for v in value]
        return [_scalar_out(fd, v) for v in value]
    if fd.type == FD.TYPE_MESSAGE:
        return _message_out(value)
    return _scalar_out(fd, value)


def _message_out(msg: pb_message.Message) -> Any:
    if isinstance(msg, duration_pb2.Duration):
        return format_duration(msg)
    return message_to_dict(msg)


def config_to_dict(cfg: config_pb2.FlynnConfig) -> dict[str, Any]:
    return message_to_dict(cfg)


def config_to_yaml(cfg: pb_message.Message | Mapping[str, Any] | Any) -> str:
    data = message_to_dict(cfg) if isinstance(cfg, pb_message.Message) else cfg
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


# --- dotted paths -----------------------------------------------------------------------------


def field_path_error(root: Any, dotted: str) -> str | None:
    """Why `dotted` is not a settable field path of `root` (None when it is one)."""
    if not dotted:
        return "empty path"
    desc: Any = root
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if desc is None:
            return f"{'.'.join(parts[:i])} has no sub-fields"
        fd: Field = desc.fields_by_name.get(part)
        if fd is None:
            where = ".".join(parts[:i]) or "the config"
            return f"{part!r} is not a field of {where}"
        last = i == len(parts) - 1
        if not last and (
            fd.is_repeated
            or fd.type != FD.TYPE_MESSAGE
            or fd.message_type.full_name == "google.protobuf.Duration"
        ):
            return f"{'.'.join(parts[: i + 1])} is a list, map or value; it can only be replaced as a whole"
        desc = fd.message_type if fd.type == FD.TYPE_MESSAGE else None
    return None


def value_at(cfg: pb_message.Message, dotted: str) -> Any:
    """Friendly value (as `get` prints it) of a dotted path; KeyError when the path is not a field."""
    if not dotted:
        return message_to_dict(cfg)
    node: pb_message.Message = cfg
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        fd = node.DESCRIPTOR.fields_by_name.get(part)
        if fd is None:
            raise KeyError(dotted)
        value = getattr(node, part)
        if i == len(parts) - 1:
            if fd.type == FD.TYPE_MESSAGE and not fd.is_repeated:
                return _message_out(value)
            return _value_out(fd, value)
        if fd.type != FD.TYPE_MESSAGE or fd.is_repeated:
            raise KeyError(dotted)
        node = value
    return None


# --- flatten and diff -------------------------------------------------------------------------


def flatten(msg: pb_message.Message, path: str = "") -> dict[str, Any]:
    """Leaf path -> friendly JSON-able value of every set field (a present empty message is a leaf {})."""
    out: dict[str, Any] = {}
    for f, value in msg.ListFields():
        fd: Field = f
        p = _join(path, fd.name)
        if _is_map(fd):
            vfd = fd.message_type.fields_by_name["value"]
            for k, v in value.items():
                kp = f"{p}[{k}]"
                if vfd.type == FD.TYPE_MESSAGE:
                    out.update(_flatten_message(v, kp))
                else:
                    out[kp] = _scalar_out(vfd, v)
        elif fd.is_repeated:
            if fd.type == FD.TYPE_MESSAGE:
                for i, v in enumerate(value):
                    out.update(_flatten_message(v, f"{p}[{i}]"))
            else:
                out[p] = [_scalar_out(fd, v) for v in value]
        elif fd.type == FD.TYPE_MESSAGE:
            out.update(_flatten_message(value, p))
        else:
            out[p] = _scalar_out(fd, value)
    return out


def _flatten_message(msg: pb_message.Message, path: str) -> dict[str, Any]:
    if isinstance(msg, duration_pb2.Duration):
        return {path: format_duration(msg)}
    inner = flatten(msg, path)
    return inner or {path: {}}


def to_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def diff(old: pb_message.Message, new: pb_message.Message) -> list[tuple[str, str, str]]:
    """(path, old JSON, new JSON) of every changed leaf, sorted; "" stands for unset."""
    a, b = flatten(old), flatten(new)
    out: list[tuple[str, str, str]] = []
    for path in sorted(set(a) | set(b)):
        va, vb = a.get(path), b.get(path)
        if path in a and path in b and va == vb:
            continue
        out.append((path, to_json(va) if path in a else "", to_json(vb) if path in b else ""))
    return out
