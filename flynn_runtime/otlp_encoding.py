"""OTLP span encoding straight to protobuf wire bytes (what the exporter's thread spends most on).

The OpenTelemetry exporter builds one protobuf object per span, attribute, value, event and link
(`encode_spans`), then serializes them: about 9 us per span and 2.8 us per attribute, on the thread
that shares the service's GIL. `encode_request` writes the same ExportTraceServiceRequest bytes
directly (field numbers from opentelemetry/proto/trace/v1/trace.proto), with each attribute key's
prefix encoded once; `tests/tracing/test_otlp_encoding.py` checks that it decodes to exactly what
`encode_spans` builds. Only the encoding is ours: the exporter, its gRPC channel, retries and
settings stay the official OTLPSpanExporter's (flynn_runtime/tracing.py)."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

_DOUBLE = struct.Struct("<d")
_FIXED64 = struct.Struct("<Q")
_FIXED32 = struct.Struct("<I")

# Span flags (trace.proto SpanFlags): the context's is_remote is known; the parent is remote.
_HAS_IS_REMOTE = 0x100
_IS_REMOTE = 0x200

# field tags (field number << 3 | wire type): 0 varint, 1 fixed64, 2 length-delimited, 5 fixed32
_T_RESOURCE_SPANS = b"\x0a"  # ExportTraceServiceRequest.resource_spans = 1
_T_RS_RESOURCE, _T_RS_SCOPE_SPANS, _T_RS_SCHEMA = b"\x0a", b"\x12", b"\x1a"
_T_SS_SCOPE, _T_SS_SPANS, _T_SS_SCHEMA = b"\x0a", b"\x12", b"\x1a"
_T_SCOPE_NAME, _T_SCOPE_VERSION, _T_SCOPE_ATTRS = b"\x0a", b"\x12", b"\x1a"
_T_ATTRS = b"\x0a"  # Resource.attributes = 1
_T_KV_KEY, _T_KV_VALUE = b"\x0a", b"\x12"
_T_SPAN_ATTRS = b"\x4a"  # Span.attributes = 9
_T_EVENT_ATTRS = b"\x1a"  # Span.Event.attributes = 3
_T_LINK_ATTRS = b"\x22"  # Span.Link.attributes = 4
_T_ARRAY_VALUES = b"\x0a"  # ArrayValue.values = 1, KeyValueList.values = 1

_KINDS = {0: 1, 1: 2, 2: 3, 3: 4, 4: 5}  # SpanKind (API enum value) -> Span.SpanKind (proto)


_SMALL = [bytes((i,)) for i in range(0x80)]  # one-byte varints (most lengths)


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _SMALL[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _int64(n: int) -> bytes:
    return _varint(n & 0xFFFFFFFFFFFFFFFF)  # negative int64: two's complement, ten bytes


def _field(tag: bytes, payload: bytes) -> bytes:
    n = len(payload)
    return tag + (_SMALL[n] if n < 0x80 else _varint(n)) + payload


def _string(tag: bytes, text: str) -> bytes:
    return _field(tag, text.encode()) if text else b""


def _value(v: Any) -> bytes:
    """An AnyValue message (the same cases, in the same order, as the official encoder)."""
    if v is None:
        return b""
    if isinstance(v, bool):
        return b"\x10\x01" if v else b"\x10\x00"
    if isinstance(v, str):
        return _field(b"\x0a", v.encode())
    if isinstance(v, int):
        return b"\x18" + _int64(v)
    if isinstance(v, float):
        return b"\x21" + _DOUBLE.pack(v)
    if isinstance(v, bytes):
        return _field(b"\x3a", v)
    if isinstance(v, Sequence):
        return _field(b"\x2a", b"".join(_field(_T_ARRAY_VALUES, _value(x)) for x in v))
    if isinstance(v, Mapping):
        return _field(b"\x32", b"".join(_field(_T_ARRAY_VALUES, _key_value(str(k), x)) for k, x in v.items()))
    raise TypeError(f"invalid attribute value type {type(v).__name__}")


# KeyValue.key, encoded once per key (a service uses a few dozen keys).
_KEYS: dict[str, bytes] = {}
_KEYS_MAX = 4096


def _key(key: str) -> bytes:
    enc = _KEYS.get(key)
    if enc is None:
        enc = _string(_T_KV_KEY, key)
        if len(_KEYS) < _KEYS_MAX:
            _KEYS[key] = enc
    return enc


def _key_value(key: str, v: Any) -> bytes:
    return _key(key) + _field(_T_KV_VALUE, _value(v))


# (field tag, key, text) -> the encoded attribute field: most string values repeat (the method, the
# mode, the status code, the reply kind); ids do not, so the cache is emptied when it is full.
_PAIRS: dict[tuple[bytes, str, str], bytes] = {}
_PAIRS_MAX = 4096


# Keys whose values are ids, new with each span: never worth a place in _PAIRS.
_UNIQUE = frozenset(
    {"flynn.message.id", "flynn.run.id", "flynn.reply.id", "flynn.reaction.event_id", "flynn.node.invoke_id"}
)


def _attribute(tag: bytes, key: str, v: Any) -> bytes:
    if v.__class__ is not str:
        return _field(tag, _key_value(key, v))
    if key in _UNIQUE:
        return _text_attribute(tag, key, v)
    pair = (tag, key, v)
    enc = _PAIRS.get(pair)
    if enc is None:
        if len(_PAIRS) >= _PAIRS_MAX:
            _PAIRS.clear()
        enc = _PAIRS[pair] = _text_attribute(tag, key, v)
    return enc


def _text_attribute(tag: bytes, key: str, v: str) -> bytes:
    """`_field(tag, _key_value(key, v))` for a string value, in one step (the common case)."""
    b = v.encode()
    n = len(b)
    if n >= 0x7C:  # a long value: the lengths take more than one byte
        return _field(tag, _key_value(key, v))
    kv = _key(key) + b"\x12" + _SMALL[n + 2] + b"\x0a" + _SMALL[n] + b
    m = len(kv)
    return tag + (_SMALL[m] if m < 0x80 else _varint(m)) + kv


def _attributes(tag: bytes, attributes: Mapping[str, Any] | None) -> bytes:
    if not attributes:
        return b""
    # An SDK span's attributes are a read-only view of BoundedAttributes, whose copy() is a plain
    # dict: iterating that is several times cheaper than the Mapping protocol.
    if attributes.__class__ is not dict:
        copy = getattr(attributes, "copy", None)
        attributes = copy() if copy is not None else attributes
    return b"".join([_attribute(tag, k, v) for k, v in attributes.items()])


def _trace_state(trace_state: Any) -> str:
    return ",".join(f"{k}={v}" for k, v in trace_state.items()) if trace_state else ""


# Span.flags = 16 (fixed32): the parent is local (or there is none), or remote.
_FLAGS_LOCAL = b"\x85\x01" + _FIXED32.pack(_HAS_IS_REMOTE)
_FLAGS_REMOTE = b"\x85\x01" + _FIXED32.pack(_HAS_IS_REMOTE | _IS_REMOTE)

# Fields that repeat from span to span, encoded once: the kind (by SpanKind), the name.
_KIND_FIELDS: dict[Any, bytes] = {}
_NAMES: dict[str, bytes] = {}
_NAMES_MAX = 1024


_last_status: tuple[Any, bytes] = (None, b"")  # most spans share one status object (unset)


def _status(status: Any) -> bytes:
    global _last_status
    last, enc = _last_status
    if status is last:
        return enc
    st = _string(b"\x12", status.description or "")
    if status.status_code.value:
        st += b"\x18" + _varint(status.status_code.value)
    enc = _field(b"\x7a", st)
    _last_status = (status, enc)
    return enc


def _kind(kind: Any) -> bytes:
    enc = _KIND_FIELDS.get(kind)
    if enc is None:
        enc = _KIND_FIELDS[kind] = b"\x30" + _varint(_KINDS[kind.value])
    return enc


def _name(name: str) -> bytes:
    enc = _NAMES.get(name)
    if enc is None:
        enc = _string(b"\x2a", name)
        if len(_NAMES) < _NAMES_MAX:
            _NAMES[name] = enc
    return enc


def _dropped(container: Any) -> int:
    """What a span's bounded attributes, events or links dropped (0 for a plain dict, tuple or list)."""
    if container is None or container.__class__ in (dict, tuple, list):
        return 0
    return int(getattr(container, "dropped", 0))


_readable_span: Any = None  # opentelemetry.sdk.trace.ReadableSpan, bound at the first span


def _span(s: Any) -> bytes:
    global _readable_span
    if _readable_span is None:
        from opentelemetry.sdk.trace import ReadableSpan

        _readable_span = ReadableSpan
    if s.__class__ is _readable_span:
        # Exactly the SDK's ReadableSpan (what Flynn's RecordingSpan ends into, and what the SDK's
        # own spans are copied into): its fields as they are, without a property call, a read-only
        # view and a tuple copy each.
        sc, parent, name, kind = s._context, s._parent, s._name, s._kind
        start, end, attributes, status = s._start_time, s._end_time, s._attributes, s._status
        events, links = s._events or (), s._links or ()
        dropped, dropped_events, dropped_links = _dropped(attributes), _dropped(s._events), _dropped(s._links)
    else:
        sc, parent, name, kind = s.context, s.parent, s.name, s.kind
        start, end, attributes, status = s.start_time, s.end_time, s.attributes, s.status
        events, links = s.events, s.links
        dropped, dropped_events, dropped_links = s.dropped_attributes, s.dropped_events, s.dropped_links
    parts = [
        b"\x0a\x10" + sc.trace_id.to_bytes(16, "big") + b"\x12\x08" + sc.span_id.to_bytes(8, "big"),
        _string(b"\x1a", _trace_state(sc.trace_state)) if sc.trace_state else b"",
        b"\x22\x08" + parent.span_id.to_bytes(8, "big") if parent else b"",
        _name(name),
        _kind(kind),
        b"\x39" + _FIXED64.pack(start) if start else b"",
        b"\x41" + _FIXED64.pack(end) if end else b"",
        _attributes(_T_SPAN_ATTRS, attributes),
    ]
    if dropped:
        parts.append(b"\x50" + _varint(dropped))
    for e in events:
        ev = [
            b"\x09" + _FIXED64.pack(e.timestamp) if e.timestamp else b"",
            _string(b"\x12", e.name),
            _attributes(_T_EVENT_ATTRS, e.attributes),
        ]
        if e.dropped_attributes:
            ev.append(b"\x20" + _varint(e.dropped_attributes))
        parts.append(_field(b"\x5a", b"".join(ev)))
    if dropped_events:
        parts.append(b"\x60" + _varint(dropped_events))
    for link in links:
        lc = link.context
        lk = [
            b"\x0a\x10" + lc.trace_id.to_bytes(16, "big"),
            b"\x12\x08" + lc.span_id.to_bytes(8, "big"),
            _attributes(_T_LINK_ATTRS, link.attributes),
        ]
        if link.dropped_attributes:
            lk.append(b"\x28" + _varint(link.dropped_attributes))
        lk.append(b"\x35" + _FIXED32.pack(_HAS_IS_REMOTE | (_IS_REMOTE if lc.is_remote else 0)))
        parts.append(_field(b"\x6a", b"".join(lk)))
    if dropped_links:
        parts.append(b"\x70" + _varint(dropped_links))
    if status is not None:
        parts.append(_status(status))
    parts.append(_FLAGS_REMOTE if parent is not None and parent.is_remote else _FLAGS_LOCAL)
    return b"".join(parts)


def _scope(scope: Any) -> bytes:
    if scope is None:
        return b""
    return (
        _string(_T_SCOPE_NAME, scope.name)
        + _string(_T_SCOPE_VERSION, scope.version or "")
        + _attributes(_T_SCOPE_ATTRS, scope.attributes)
    )


# Resource -> its encoded Resource message (a process has one resource, immutable).
_RESOURCES: dict[int, tuple[Any, bytes]] = {}


def _resource(resource: Any) -> bytes:
    cached = _RESOURCES.get(id(resource))
    if cached is not None and cached[0] is resource:
        return cached[1]
    enc = _attributes(_T_ATTRS, resource.attributes)
    if len(_RESOURCES) < 64:
        _RESOURCES[id(resource)] = (resource, enc)
    return enc


def encode_request(spans: Iterable[Any]) -> bytes:
    """The serialized ExportTraceServiceRequest of `spans` (SDK ReadableSpans), grouped by resource
    and instrumentation scope as the official encoder groups them."""
    grouped: dict[int, tuple[Any, dict[Any, list[bytes]]]] = {}
    for s in spans:
        resource = s.resource
        entry = grouped.get(id(resource))
        if entry is None:
            entry = grouped[id(resource)] = (resource, {})
        entry[1].setdefault(s.instrumentation_scope or None, []).append(_span(s))
    out = []
    for resource, scopes in grouped.values():
        body = [_field(_T_RS_RESOURCE, _resource(resource))]
        for scope, encoded in scopes.items():
            ss = [_field(_T_SS_SCOPE, _scope(scope))]
            ss.extend(_field(_T_SS_SPANS, e) for e in encoded)
            if scope is not None and scope.schema_url:
                ss.append(_string(_T_SS_SCHEMA, scope.schema_url))
            body.append(_field(_T_RS_SCOPE_SPANS, b"".join(ss)))
        body.append(_string(_T_RS_SCHEMA, resource.schema_url or ""))
        out.append(_field(_T_RESOURCE_SPANS, b"".join(body)))
    return b"".join(out)
