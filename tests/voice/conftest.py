"""Voice fixtures: one warm voice service process per session (piper worker loaded once)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.mesh import ServiceProcess, Tokens, make_tokens
from tests.support.voice import voice_process


@pytest.fixture(scope="session")
def voice_tokens(tmp_path_factory: pytest.TempPathFactory) -> Tokens:
    return make_tokens(tmp_path_factory.mktemp("voice-tokens"))


@pytest.fixture(scope="session")
def voice_svc(tmp_path_factory: pytest.TempPathFactory, voice_tokens: Tokens) -> Iterator[ServiceProcess]:
    proc = voice_process(Path(tmp_path_factory.mktemp("voice")), voice_tokens).start(timeout=90)
    try:
        yield proc
    finally:
        proc.stop()
