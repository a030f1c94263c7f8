"""Test support for the config service: in-process servers, settings with config flags, seed files."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import yaml
from flynn.v1 import config_pb2, config_pb2_grpc, principals_pb2
from google.protobuf import field_mask_pb2

from flynn_runtime import config_yaml
from flynn_runtime import settings as settings_mod
from flynn_runtime.channels import client_channel
from flynn_runtime.server import RunningServer, running
from tests.support.mesh import Tokens, make_settings

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SEED = ROOT / "config" / "flynn.yaml"


def config_settings(
    data_dir: Path,
    tokens: Tokens,
    seed_file: Path | None = None,
    bookmark_seconds: float = 15.0,
    watch_queue_size: int = 256,
    listen: str = "127.0.0.1:0",
    database_url: str = "",
) -> settings_mod.Settings:
    s = make_settings("config", data_dir, tokens)
    extra: dict[str, Any] = {
        "seed_file": str(seed_file or DEFAULT_SEED),
        "bookmark_seconds": bookmark_seconds,
        "watch_queue_size": watch_queue_size,
    }
    return dataclasses.replace(s, listen=listen, extra=extra, database_url=database_url)


def client_settings(service: str, data_dir: Path, tokens: Tokens, config_addr: str) -> settings_mod.Settings:
    """Settings of a service that watches the config (its instance id is unique per data dir)."""
    s = make_settings(service, data_dir, tokens, addresses={"config": config_addr})
    return dataclasses.replace(s, instance_id=f"{service}@{data_dir.name}")


@contextlib.asynccontextmanager
async def config_server(data_dir: Path, tokens: Tokens, **kw: Any) -> AsyncIterator[RunningServer]:
    from config_svc.app import ConfigApp

    async with running(config_settings(data_dir, tokens, **kw), ConfigApp) as srv:
        yield srv


def stub(address: str, token: str) -> config_pb2_grpc.ConfigServiceStub:
    return config_pb2_grpc.ConfigServiceStub(client_channel(address, token))


def write_seed(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return path


async def until_credential_pushed(
    stream: grpc.aio.UnaryStreamCall[Any, Any], fingerprint: str, within: float
) -> None:
    """Read a WatchPrincipals stream until a snapshot carries the credential `fingerprint` (at most
    `within` seconds). Polling WhoAmI instead would trip the failed-authentication limiter."""
    async with asyncio.timeout(within):
        while True:
            snap = await stream.read()
            assert isinstance(snap, principals_pb2.WatchPrincipalsResponse)
            if fingerprint in {c.sha256[:16] for c in snap.credentials}:
                return


def field_update(path: str, value: object, *, head: int, reason: str = "") -> config_pb2.UpdateConfigRequest:
    """UpdateConfig of the one field `path` (a dotted path, `value` as config YAML spells it),
    expected at revision `head`."""
    return config_pb2.UpdateConfigRequest(
        config=config_yaml.dict_to_config({path: value}),
        update_mask=field_mask_pb2.FieldMask(paths=[path]),
        expected_revision=head,
        reason=reason,
    )
