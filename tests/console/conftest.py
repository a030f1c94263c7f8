"""Fixtures for the console browser tests: one real mesh + console per module, one headless Chromium."""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.console import CHROMIUM, CHROMIUM_ARGS, ConsoleMesh
from tests.support.mesh import ROOT, make_tokens

ARTIFACTS = ROOT / "test-artifacts" / "console"
OPERATOR_NAME = "alice"
VOICE_CHANNEL = "voice-chat"
SEED = f"""
server:
  queue:
    mode: collect
    quiet_window: 20ms
  agent:
    think_time: 200ms
    chunks: 3
    chunk_interval: 100ms
  nodes:
    enabled: true
    allowed_roles: [desktop, phone]
    feature_gates:
      ui:
        canvas: true
tts:
  enabled: true
  enabled_channels: [{VOICE_CHANNEL}]
  engines: [espeak-ng]
  deadline: 3s
  encoding: LINEAR16
automation:
  reactions:
    - id: ping-ack
      description: Ack messages that say ping.
      enabled: true
      trigger: {{event: message_received, keywords: [ping]}}
      actions:
        - ack: {{emoji: "👀"}}
"""


def _browser_missing() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is not installed (scripts/bootstrap.sh --with-browser installs it)"
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (scripts/bootstrap.sh --with-browser, requirements-browser.lock)"
    return None


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleMesh]:
    root = Path(tmp_path_factory.mktemp("console"))
    m = ConsoleMesh(root, make_tokens(root, operator_name=OPERATOR_NAME), SEED)
    try:
        m.start()
        yield m
    finally:
        m.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    missing = _browser_missing()
    if missing:
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    user_data = tempfile.mkdtemp(prefix="flynn-console-chromium-")
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            user_data,
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000},
        )
        ctx.set_default_timeout(20_000)
        try:
            yield ctx
        finally:
            ctx.close()
            shutil.rmtree(user_data, ignore_errors=True)


def shot(page: Any, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
