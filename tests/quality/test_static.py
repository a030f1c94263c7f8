"""Static quality gates over every handwritten package: mypy --strict (pyproject config) and ruff.

Packages are discovered (every top-level folder holding Python code, minus generated code, tests
and non-code folders), so a new service is covered the day it lands.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
NOT_PACKAGES = {"gen", "tests", "build", "docs", "charts", "protos", "config", "scripts", "node_modules"}


def handwritten_packages() -> list[str]:
    return sorted(
        p.name
        for p in ROOT.iterdir()
        if p.is_dir() and not p.name.startswith(".") and p.name not in NOT_PACKAGES and any(p.glob("*.py"))
    )


def _tool(name: str) -> str:
    local = VENV_BIN / name
    return str(local) if local.exists() else name


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run(list(args), cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def test_discovers_the_known_packages() -> None:
    found = handwritten_packages()
    for pkg in ("flynn_runtime", "gateway", "flynn_launcher"):
        assert pkg in found


def test_mypy_strict() -> None:
    out = _run(_tool("mypy"), *handwritten_packages())
    assert out.returncode == 0, out.stdout[-20000:] + out.stderr[-5000:]


def test_ruff_check() -> None:
    out = _run(_tool("ruff"), "check", *handwritten_packages(), "tests", "scripts")
    assert out.returncode == 0, out.stdout[-20000:] + out.stderr[-5000:]


def test_ruff_format() -> None:
    out = _run(_tool("ruff"), "format", "--check", *handwritten_packages(), "tests", "scripts")
    assert out.returncode == 0, out.stdout[-20000:] + out.stderr[-5000:]
