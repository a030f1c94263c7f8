"""The mesh's bearer tokens: generated once per data dir, kept across restarts.

<data>/secrets/<name>.token holds each plaintext token (mode 0600, in a 0700 folder) so a restart
prints the same operator token; <data>/secrets/tokens.yaml holds only their hashes, which is what
the services load. One principal each (docs/operations/SECURITY.md):

  operator.token          the operator, named after the local user ($USER)
  channel.token           channel principal "cli", bound to channel "cli"
  service-<name>.token    each service's own credential, scoped to the methods it calls
  agent.token             presented by run control to external agents; grants nothing in the mesh
  node.token              the legacy shared node role (nodes use per-node tokens)

More principals: `flynn tokens issue` (flynn.v1.Principals on the config service).
"""

from __future__ import annotations

import getpass
import os
import re
from dataclasses import dataclass, field

from flynn_launcher.plan import MeshPaths
from flynn_runtime import topology
from flynn_runtime.auth import Role, generate_token, write_tokens_file

CLI_CHANNEL = "cli"
SERVICES = tuple(topology.SERVICES)


def service_token_name(service: str) -> str:
    return f"service-{service}"


def operator_name() -> str:
    try:
        raw = os.environ.get("USER") or getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name: a neutral one
        raw = ""
    name = re.sub(r"[^A-Za-z0-9._@-]", "", raw)[:64]
    return name or "operator"


@dataclass(frozen=True)
class MeshTokens:
    operator: str
    channel: str
    agent: str
    node: str
    services: dict[str, str] = field(default_factory=dict)


def _write_secret(path: os.PathLike[str], value: str) -> None:
    tmp = f"{os.fspath(path)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, (value + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _ensure(paths: MeshPaths, file_name: str) -> str:
    f = paths.token_file(file_name)
    if f.exists() and f.read_text().strip():
        return f.read_text().strip()
    value = generate_token()
    _write_secret(f, value)
    return value


def ensure_tokens(paths: MeshPaths) -> MeshTokens:
    paths.secrets.mkdir(parents=True, exist_ok=True)
    os.chmod(paths.secrets, 0o700)
    op, ch, agent, node = (_ensure(paths, n) for n in ("operator", "channel", "agent", "node"))
    services = {s: _ensure(paths, service_token_name(s)) for s in SERVICES}
    old_shared = paths.token_file("service")
    old_shared.unlink(missing_ok=True)  # the single shared service token of earlier versions
    op_name = operator_name()
    entries: dict[str, tuple[Role, str]] = {op_name: (Role.OPERATOR, op), CLI_CHANNEL: (Role.CHANNEL, ch)}
    entries.update({s: (Role.SERVICE, t) for s, t in services.items()})
    entries["agent"] = (Role.AGENT, agent)
    entries["node"] = (Role.NODE, node)
    write_tokens_file(paths.tokens_file, entries, channels={CLI_CHANNEL: [CLI_CHANNEL]})
    return MeshTokens(op, ch, agent, node, services)


def read_token(paths: MeshPaths, role: str) -> str:
    f = paths.token_file(role)
    return f.read_text().strip() if f.exists() else ""
