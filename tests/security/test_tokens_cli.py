"""`flynn tokens issue|list|revoke|whoami` against the real gateway."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.security.conftest import SecureMesh
from tests.support.mesh import ROOT


def flynn(mesh: SecureMesh, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(
        os.environ,
        FLYNN_ADDR=mesh.gateway,
        FLYNN_TOKEN=token if token is not None else mesh.tokens.operator,
        PYTHONPATH=f"{ROOT}:{ROOT / 'gen'}",
    )
    return subprocess.run(
        [sys.executable, "-m", "flynn_cli.main", "tokens", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
        check=False,
    )


def test_tokens_cli_lifecycle(secure_mesh: SecureMesh) -> None:
    out = flynn(secure_mesh, "issue", "slack-bot", "--role", "channel", "--channel", "slack")
    assert out.returncode == 0, out.stderr
    token = next(line.split(": ", 1)[1] for line in out.stdout.splitlines() if line.startswith("token: "))
    secure_mesh.wait_known(token)
    who = flynn(secure_mesh, "whoami", token=token)
    assert who.returncode == 0 and "slack-bot" in who.stdout and "channels=slack" in who.stdout, who
    listed = flynn(secure_mesh, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    principals = json.loads(listed.stdout)["principals"]
    assert any(p["name"] == "slack-bot" and p["source"] == "issued" for p in principals)
    assert token not in listed.stdout
    revoked = flynn(secure_mesh, "revoke", "slack-bot", "--reason", "rotated")
    assert revoked.returncode == 0 and "revoked: slack-bot" in revoked.stdout, revoked
    assert flynn(secure_mesh, "revoke", "slack-bot").returncode == 1  # nothing left to revoke: NOT_FOUND
    assert flynn(secure_mesh, "revoke").returncode == 2
    # a channel can't issue tokens
    refused = flynn(secure_mesh, "issue", "x", "--role", "operator", token=secure_mesh.tokens.channel)
    assert refused.returncode == 1 and "PERMISSION_DENIED" in refused.stderr
