"""Fixtures for the image tests: the images built by scripts/build-image, the chart rendered for them.

The images are built once per session (FLYNN_IMAGE_BASE: "debian" (default here: a base made from
Debian packages, no registry needed) or "published"); the wheelhouse and the Debian base are cached
under FLYNN_CACHE_DIR (default /var/cache/flynn), so a warm run only checks that the layers are current.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import secrets
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helm.conftest import ROOT, Manifest, install_helm, parse, render

_spec = importlib.util.spec_from_file_location("build_image", ROOT / "scripts" / "build_image.py")
assert _spec is not None and _spec.loader is not None
build_image = importlib.util.module_from_spec(_spec)
sys.modules["build_image"] = build_image  # dataclasses look their module up there
_spec.loader.exec_module(build_image)

TAG = "test"
CHANNEL = "voice-demo"

# The runtime config the chart seeds: speech on for CHANNEL with the neural engines first, so a reply
# on it is spoken by piper and a voice note is heard by faster-whisper, both from inside the image.
RUNTIME_CONFIG: dict[str, Any] = {
    "server": {
        "queue": {"mode": "collect", "cap": 50, "drop": "old", "quiet_window": "50ms"},
        "agent": {"think_time": "20ms", "chunks": 2, "chunk_interval": "5ms", "run_timeout": "60s"},
        "nodes": {
            "enabled": True,
            "allowed_roles": ["desktop", "phone"],
            "heartbeat_interval": "1s",
            "lease": "5s",
            "feature_gates": {"ui": {"canvas": True}},
        },
    },
    "tts": {
        "enabled": True,
        "enabled_channels": [CHANNEL],
        "engines": ["piper", "espeak-ng"],
        "deadline": "30s",
    },
    "audio": {"enabled": True, "engines": ["faster-whisper", "pocketsphinx"], "deadline": "60s"},
    "automation": {"reactions": []},
}


@dataclass(frozen=True)
class Images:
    runtime: str
    voice: str
    sizes: dict[str, int]


@pytest.fixture(scope="session")
def images() -> Images:
    if os.geteuid() != 0:
        pytest.skip(
            "the image tests run rootful podman (runc; rootless podman is not set up here): run as root"
        )
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed: scripts/bootstrap.sh --with-image installs it")
    base = os.environ.get("FLYNN_IMAGE_BASE", "debian")
    built = build_image.build(base=base, tag=TAG, quiet=True, every_stage=False)
    return Images(built.runtime, built.voice, built.sizes)


@dataclass(frozen=True)
class Rendered:
    docs: list[Manifest]
    channel_token: str


@pytest.fixture(scope="session")
def rendered(images: Images, tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    helm = Path(install_helm.install())
    token = "flt_" + secrets.token_urlsafe(32)
    values = {
        "image": {
            "repository": images.runtime.rsplit(":", 1)[0],
            "tag": TAG,
            "voiceRepository": images.voice.rsplit(":", 1)[0],
            "pullPolicy": "Never",
        },
        "auth": {
            "extraTokens": [
                {
                    "name": "image-test-channel",
                    "role": "channel",
                    "sha256": hashlib.sha256(token.encode()).hexdigest(),
                    # a channel principal serves only its channels (SECURITY.md "Principals")
                    "channels": [CHANNEL],
                }
            ]
        },
        # One pod per workload on a 2-core machine; the pods are the same for any replica count.
        "gateway": {"replicas": 1},
        "voice": {"replicas": 1},
        "runtimeConfig": RUNTIME_CONFIG,
    }
    path = tmp_path_factory.mktemp("values") / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return Rendered(parse(render(helm, "-f", str(path))), token)
