"""The applied runtime config of a process, and change subscriptions by dotted key.

`ConfigSource` holds the last applied FlynnConfig and its revision, swaps it atomically, and calls
subscribers whose key changed. `config_watcher.ConfigWatcher` feeds it from the config service;
`StaticConfig` feeds it by hand (unit tests of domain code, tools).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from flynn.v1 import config_pb2
from google.protobuf import message as pb_message

log = logging.getLogger(__name__)

Callback = Callable[[config_pb2.FlynnConfig, config_pb2.FlynnConfig, int], Awaitable[None] | None]
Validator = Callable[[config_pb2.FlynnConfig], None]


def get_path(cfg: pb_message.Message, dotted: str) -> object:
    """Value of a dotted field path ("server.queue.mode"); messages are returned as messages."""
    node: object = cfg
    for part in dotted.split(".") if dotted else []:
        node = getattr(node, part)
    return node


def _key_changed(old: config_pb2.FlynnConfig, new: config_pb2.FlynnConfig, key: str | None) -> bool:
    if key is None:
        return old != new
    a, b = get_path(old, key), get_path(new, key)
    return bool(a != b)


@dataclass
class _Subscription:
    key: str | None
    callback: Callback


class ConfigSource:
    """Last applied config; `apply` validates, swaps and notifies; readers never see half a config."""

    def __init__(self, validator: Validator | None = None) -> None:
        self._config = config_pb2.FlynnConfig()
        self._revision = 0
        self._validator = validator
        self._subs: list[_Subscription] = []
        # wait_for_revision callers: (revision, future), resolved by apply (nothing to do when empty).
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    @property
    def config(self) -> config_pb2.FlynnConfig:
        """The applied config. Treat it as read-only: it is replaced, never mutated."""
        return self._config

    @property
    def revision(self) -> int:
        return self._revision

    def subscribe(self, callback: Callback, key: str | None = None) -> Callable[[], None]:
        """Call `callback(old, new, revision)` after each applied revision that changes `key`."""
        sub = _Subscription(key, callback)
        self._subs.append(sub)
        return lambda: self._subs.remove(sub) if sub in self._subs else None

    async def apply(self, config: config_pb2.FlynnConfig, revision: int, *, owned: bool = False) -> None:
        """Validate (raises on refusal, keeping the old config), swap, then notify subscribers.

        `owned`: the caller hands `config` over and never touches it again (a message just parsed
        from the wire), so it is kept as is instead of copied."""
        if self._validator is not None:
            self._validator(config)
        old = self._config
        if owned:
            fresh = config
        else:
            fresh = config_pb2.FlynnConfig()
            fresh.CopyFrom(config)
        self._config, self._revision = fresh, revision
        for sub in list(self._subs):
            if not _key_changed(old, fresh, sub.key):
                continue
            try:
                result = sub.callback(old, fresh, revision)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("config subscriber failed", extra={"key": sub.key, "revision": revision})
        if self._waiters:
            waiting, self._waiters = self._waiters, []
            for want, fut in waiting:
                if fut.done():
                    continue
                if revision >= want:
                    fut.set_result(None)
                else:
                    self._waiters.append((want, fut))

    async def wait_for_revision(self, revision: int, within_seconds: float) -> bool:
        """Wait until a revision >= `revision` is applied; False on timeout."""
        if self._revision >= revision:
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (revision, fut)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(fut, within_seconds)
            return True
        except TimeoutError:
            return False
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)


class StaticConfig(ConfigSource):
    """A ConfigSource set by hand: for domain unit tests and tools that run without the mesh."""

    def __init__(self, config: config_pb2.FlynnConfig | None = None, revision: int = 1) -> None:
        super().__init__()
        if config is not None:
            self._config = config
            self._revision = revision
