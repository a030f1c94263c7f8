"""The mesh's bearer tokens: generated once per data dir, kept across restarts.

<data>/secrets/<role>.token holds each plaintext token (mode 0600, in a 0700 folder) so a restart
prints the same operator token; <data>/secrets/tokens.yaml holds only their hashes, which is what
the services load.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from flynn_launcher.plan import MeshPaths
from flynn_runtime.auth import Role, generate_token, write_tokens_file

ROLES = ("operator", "channel", "service", "node")


@dataclass(frozen=True)
class MeshTokens:
    operator: str
    channel: str
    service: str
    node: str


def _write_secret(path: os.PathLike[str], value: str) -> None:
    tmp = f"{os.fspath(path)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, (value + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def ensure_tokens(paths: MeshPaths) -> MeshTokens:
    paths.secrets.mkdir(parents=True, exist_ok=True)
    os.chmod(paths.secrets, 0o700)
    values: dict[str, str] = {}
    for role in ROLES:
        f = paths.token_file(role)
        if f.exists() and f.read_text().strip():
            values[role] = f.read_text().strip()
        else:
            values[role] = generate_token()
            _write_secret(f, values[role])
    write_tokens_file(paths.tokens_file, {role: (Role(role), values[role]) for role in ROLES})
    return MeshTokens(**values)


def read_token(paths: MeshPaths, role: str) -> str:
    f = paths.token_file(role)
    return f.read_text().strip() if f.exists() else ""
