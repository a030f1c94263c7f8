"""Fixtures for the chart tests: the real helm binary (scripts/install_helm.py), rendered manifests."""

from __future__ import annotations

import importlib.util
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "flynn"
PRODUCTION_VALUES = CHART / "ci" / "production-values.yaml"
DATABASE_VALUES = CHART / "ci" / "database-values.yaml"

_spec = importlib.util.spec_from_file_location("install_helm", ROOT / "scripts" / "install_helm.py")
assert _spec is not None and _spec.loader is not None
install_helm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(install_helm)

Manifest = dict[str, Any]


@pytest.fixture(scope="session")
def helm() -> Path:
    return Path(install_helm.install())


def run_helm(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def render(helm: Path, *args: str, release: str = "rel", namespace: str = "flynn") -> str:
    proc = run_helm(helm, "template", release, str(CHART), "--namespace", namespace, *args)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def parse(text: str) -> list[Manifest]:
    return [d for d in yaml.safe_load_all(text) if d]


@pytest.fixture(scope="session")
def default_text(helm: Path) -> str:
    return render(helm)


@pytest.fixture(scope="session")
def production_text(helm: Path) -> str:
    return render(helm, "-f", str(PRODUCTION_VALUES), release="flynn", namespace="prod")


@pytest.fixture(scope="session")
def database_text(helm: Path) -> str:
    """The stateful services on PostgreSQL (database.existingSecret + urlKey): no PVCs."""
    return render(helm, "-f", str(DATABASE_VALUES))


@pytest.fixture(scope="session")
def default_docs(default_text: str) -> list[Manifest]:
    return parse(default_text)


@pytest.fixture(scope="session")
def production_docs(production_text: str) -> list[Manifest]:
    return parse(production_text)


@pytest.fixture(scope="session", params=["default", "production"])
def rendered(request: pytest.FixtureRequest) -> list[Manifest]:
    docs: list[Manifest] = request.getfixturevalue(f"{request.param}_docs")
    return docs


@pytest.fixture(scope="session")
def values_of() -> Callable[[str], dict[str, Any]]:
    def load(which: str) -> dict[str, Any]:
        values: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
        if which == "production":
            values.update(yaml.safe_load(PRODUCTION_VALUES.read_text()))
        return values

    return load
