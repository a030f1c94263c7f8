"""Config service metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

HEAD_REVISION = Gauge("config_head_revision", "Head revision of the config history.")
WATCH_STREAMS = Gauge("config_watch_streams", "Open WatchConfig streams.")
WATCHERS_TOO_SLOW = Counter(
    "config_watchers_too_slow_total", "Watch streams closed because their queue overflowed."
)
REVISIONS_COMMITTED = Counter("config_revisions_committed_total", "Committed revisions, by kind.", ["kind"])
NACKS = Counter("config_nacks_total", "Revisions refused by a watcher (NACK reports).", ["service"])
