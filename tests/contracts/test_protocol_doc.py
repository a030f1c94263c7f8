"""docs/api/PROTOCOL.md lists every service and method of the protos, with current tables."""

from __future__ import annotations

import re
import subprocess
import sys

from gateway.descriptors import flynn_services
from tests.contracts.conftest import ROOT

DOC = ROOT / "docs" / "api" / "PROTOCOL.md"


def test_generated_tables_are_current() -> None:
    out = subprocess.run(
        [sys.executable, "scripts/gen_protocol_doc.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_service_and_method_is_documented() -> None:
    doc = DOC.read_text()
    sections = dict(re.findall(r"^### (flynn\.v1\.\w+)\n(.*?)(?=^### |\Z)", doc, flags=re.M | re.S))
    services = flynn_services()
    assert len(services) == 11
    for svc in services:
        assert svc.full_name in sections, f"{svc.full_name} missing from PROTOCOL.md"
        documented = set(re.findall(r"^\| `(\w+)` \|", sections[svc.full_name], flags=re.M))
        assert documented == {m.name for m in svc.methods}, svc.full_name
