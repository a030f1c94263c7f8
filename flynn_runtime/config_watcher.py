"""ConfigWatcher: the ConfigSource every service runs on, fed live by ConfigService.WatchConfig.

    watcher = ConfigWatcher(runtime)          # optional: validator=..., cache_path=...
    await watcher.start()                      # applies the persisted last-known-good at once
    ...watcher.config / watcher.subscribe(cb, key="server.nodes")...
    await watcher.stop()

- start() never waits for the config service: it applies the cached config
  (<data_dir>/config-cache/<service>.bin, written crash-safely after each applied revision) and
  follows the watch in a background task that reconnects with jittered exponential backoff
  (0.1 s doubling to 5 s), resuming from the revision it holds.
- Each snapshot/change is applied atomically through ConfigSource.apply. A validator exception is a
  NACK (reported with its reason; the last good config stays); applied revisions are ACKed. Reports
  are sent by a background task that coalesces them and spreads them out (0.25-1 s after the
  apply), so reporting never slows applying, nor the config service's fan-out to other watchers.
  The cache file is written 0.2-0.4 s after an apply (one write per burst) and on stop(). Both are
  scheduled with one timer each (no task wakes up at apply time: a process with many watchers
  receives the rest of a fan-out undisturbed) and the timer is not re-armed while one is pending.
- Metrics: config_applied_revision, config_staleness_seconds (time since the last message, bookmarks
  included).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import struct
import threading
import time
import zlib
from pathlib import Path

import grpc
from flynn.v1 import config_pb2, config_pb2_grpc

from flynn_runtime import VERSION, metrics
from flynn_runtime.backoff import Backoff
from flynn_runtime.config_source import ConfigSource, Validator
from flynn_runtime.server import Runtime

log = logging.getLogger(__name__)

_MAGIC = b"FLYNNCFG1"
_HEADER = struct.Struct(">qI")  # revision, crc32 of the config bytes


def write_cache(path: Path, revision: int, blob: bytes) -> None:
    """Crash-safe: temp file, fsync, rename over, fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A temp file per thread: the watch loop's write and stop()'s final write may overlap.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    data = _MAGIC + _HEADER.pack(revision, zlib.crc32(blob)) + blob
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def read_cache(path: Path) -> tuple[int, config_pb2.FlynnConfig] | None:
    """(revision, config) of a cache file; None when missing or damaged."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    head = len(_MAGIC) + _HEADER.size
    if len(data) < head or not data.startswith(_MAGIC):
        log.warning("ignoring damaged config cache", extra={"path": str(path)})
        return None
    revision, crc = _HEADER.unpack(data[len(_MAGIC) : head])
    blob = data[head:]
    if zlib.crc32(blob) != crc:
        log.warning("ignoring config cache with a bad checksum", extra={"path": str(path)})
        return None
    cfg = config_pb2.FlynnConfig()
    cfg.ParseFromString(blob)
    return revision, cfg


class ConfigWatcher(ConfigSource):
    def __init__(
        self,
        runtime: Runtime,
        validator: Validator | None = None,
        cache_path: Path | None = None,
        *,
        channel: grpc.aio.Channel | None = None,
        identity: config_pb2.WatcherIdentity | None = None,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        report_timeout: float = 5.0,
        report_delay: float = 0.25,
        report_jitter: float = 0.75,
        persist_delay: float = 0.2,
    ) -> None:
        super().__init__(validator)
        self.runtime = runtime
        s = runtime.settings
        self.cache_path = cache_path or s.data_dir / "config-cache" / f"{s.service}.bin"
        self.identity = identity or config_pb2.WatcherIdentity(
            service=s.service, instance_id=s.instance_id, version=VERSION
        )
        self._channel = channel
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.report_timeout = report_timeout
        self.report_delay = report_delay
        self.report_jitter = report_jitter
        self.persist_delay = persist_delay
        self.last_heard = time.monotonic()
        self.connected = False
        self.reconnects = 0
        self.last_nack: tuple[int, str] = (0, "")
        self._tasks: list[asyncio.Task[None]] = []
        self._persist_pending: tuple[int, config_pb2.FlynnConfig] | None = None
        self._persist_event = asyncio.Event()
        self._report_event = asyncio.Event()
        self._persist_timer: asyncio.TimerHandle | None = None
        self._report_timer: asyncio.TimerHandle | None = None
        self._stub: tuple[grpc.aio.Channel, config_pb2_grpc.ConfigServiceAsyncStub] | None = None
        self._stopped = False
        self._connection = 0

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        cached = await asyncio.to_thread(read_cache, self.cache_path)
        if cached is not None:
            revision, cfg = cached
            try:
                await self.apply(cfg, revision)
                metrics.CONFIG_APPLIED_REVISION.set(revision)
                log.info("applied cached config", extra={"revision": revision, "path": str(self.cache_path)})
            except Exception as e:  # noqa: BLE001 - a refused cache is dropped, the watch brings a fresh one
                log.warning("cached config refused: %s", e, extra={"revision": revision})
        self.last_heard = time.monotonic()
        metrics.CONFIG_STALENESS.set_function(self.staleness)
        self._tasks = [
            asyncio.create_task(self._follow(), name="config-watch"),
            asyncio.create_task(self._persist_loop(), name="config-cache"),
            asyncio.create_task(self._report_loop(), name="config-report"),
        ]

    async def stop(self) -> None:
        self._stopped = True
        for timer in (self._persist_timer, self._report_timer):
            if timer is not None:
                timer.cancel()
        self._persist_timer = self._report_timer = None
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        self._tasks = []
        if self._persist_pending is not None:  # the last applied revision reaches the disk
            rev, cfg = self._persist_pending
            self._persist_pending = None
            await asyncio.to_thread(write_cache, self.cache_path, rev, cfg.SerializeToString())

    def staleness(self) -> float:
        return time.monotonic() - self.last_heard

    @property
    def channel(self) -> grpc.aio.Channel:
        return self._channel or self.runtime.channel("config")

    def _config_stub(self) -> config_pb2_grpc.ConfigServiceAsyncStub:
        """The stub of the current channel, built once per channel (a stub builds every method's callable)."""
        channel = self.channel
        if self._stub is None or self._stub[0] is not channel:
            self._stub = (channel, config_pb2_grpc.ConfigServiceStub(channel))
        return self._stub[1]

    # --- the watch ------------------------------------------------------------------------------

    async def _follow(self) -> None:
        backoff = Backoff(self.backoff_initial, self.backoff_max)
        while not self._stopped:
            stub = self._config_stub()
            call = stub.WatchConfig(
                config_pb2.WatchConfigRequest(after_revision=self.revision, identity=self.identity)
            )
            try:
                async for resp in call:
                    if not self.connected:
                        self.connected = True
                        backoff.reset()
                        self._connection += 1  # a restarted config service forgot our status: report again
                        self._schedule_report()
                    self.last_heard = time.monotonic()
                    await self._handle(resp)
                log.info("config watch ended; reconnecting")
            except asyncio.CancelledError:
                call.cancel()
                raise
            except grpc.aio.AioRpcError as e:
                level = logging.DEBUG if e.code() == grpc.StatusCode.UNAVAILABLE else logging.WARNING
                log.log(level, "config watch failed: %s %s", e.code().name, e.details())
            except Exception:
                log.exception("config watch failed")
            finally:
                self.connected = False
            self.reconnects += 1
            await asyncio.sleep(backoff.next_delay())

    async def _handle(self, resp: config_pb2.WatchConfigResponse) -> None:
        if resp.kind == config_pb2.WATCH_EVENT_KIND_BOOKMARK:
            return
        if resp.kind == config_pb2.WATCH_EVENT_KIND_CHANGE and resp.revision <= self.revision:
            return  # already applied (a replay overlapping what we hold)
        try:
            await self.apply(resp.config, resp.revision, owned=True)  # the response is ours alone
        except Exception as e:  # noqa: BLE001 - a refused revision is a NACK, never a crash
            reason = str(e) or type(e).__name__
            log.warning("config revision %d refused: %s", resp.revision, reason)
            self.last_nack = (resp.revision, reason[:4000])
            self._schedule_report()
            return
        metrics.CONFIG_APPLIED_REVISION.set(resp.revision)
        self._persist_pending = (resp.revision, self.config)  # applied configs are replaced, never mutated
        self._schedule_persist()
        self._schedule_report()

    # --- background: persist and report ---------------------------------------------------------

    def _schedule_persist(self) -> None:
        # A burst of revisions costs one write, not one each, and the write (an fsync) stays out of the way of
        # applying; stop() flushes what is still pending.
        if self._persist_timer is None and not self._stopped:
            self._persist_timer = asyncio.get_running_loop().call_later(
                self.persist_delay * (1 + random.random()), self._persist_due
            )

    def _persist_due(self) -> None:
        self._persist_timer = None
        self._persist_event.set()

    def _schedule_report(self) -> None:
        # Spread ACKs out: a thousand instances ACKing the same revision at once would compete with the
        # config service's fan-out of that very revision. The delay never holds back applying.
        if self._report_timer is None and not self._stopped:
            self._report_timer = asyncio.get_running_loop().call_later(
                self.report_delay + random.uniform(0, self.report_jitter), self._report_due
            )

    def _report_due(self) -> None:
        self._report_timer = None
        self._report_event.set()

    async def _persist_loop(self) -> None:
        while True:
            await self._persist_event.wait()
            self._persist_event.clear()
            pending, self._persist_pending = self._persist_pending, None
            if pending is None:
                continue
            try:
                rev, cfg = pending
                await asyncio.to_thread(write_cache, self.cache_path, rev, cfg.SerializeToString())
            except OSError:
                log.exception("cannot persist the config cache", extra={"path": str(self.cache_path)})

    async def _report_loop(self) -> None:
        reported: tuple[int, int, int] = (-1, -1, -1)
        while True:
            await self._report_event.wait()
            self._report_event.clear()
            state = (self.revision, self.last_nack[0], self._connection)
            if state == reported:
                continue
            req = config_pb2.ReportStatusRequest(
                identity=self.identity,
                applied_revision=self.revision,
                nack_revision=self.last_nack[0],
                nack_reason=self.last_nack[1],
            )
            try:
                await self._config_stub().ReportStatus(req, timeout=self.report_timeout)
                reported = state
            except grpc.aio.AioRpcError as e:
                log.debug("config status report failed: %s", e.code().name)
                await asyncio.sleep(0.5 + random.random())
                self._schedule_report()  # retry with the latest state
