"""Conversions between protobuf Timestamp/Duration and float seconds (the domain's unit)."""

from __future__ import annotations

from google.protobuf import duration_pb2, timestamp_pb2


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    """A Timestamp for a Unix time in float seconds (nanosecond resolution)."""
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def timestamp_ns(ns: int) -> timestamp_pb2.Timestamp:
    """A Timestamp for a Unix time in integer nanoseconds (exact)."""
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(ns)
    return ts


def duration(seconds: float) -> duration_pb2.Duration:
    """A Duration of float seconds (nanosecond resolution)."""
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def seconds_of(ts: timestamp_pb2.Timestamp) -> float:
    """A Timestamp as float Unix seconds."""
    return ts.ToNanoseconds() / 1e9


def duration_value(d: duration_pb2.Duration) -> float:
    """A Duration as float seconds, as it is (zero when unset, negative when negative)."""
    return d.seconds + d.nanos / 1e9


def duration_seconds(d: duration_pb2.Duration, default: float = 0.0) -> float:
    """A Duration as float seconds; `default` when it is unset, zero or negative."""
    value = duration_value(d)
    return value if value > 0 else default
