"""Who this replica is to the others: a per-process replica id and the address it is reached at.

Replicas of one service on one database record which replica owns what (a node's stream, a lease)
by replica id, and forward calls to the owner's advertised address:

- `FLYNN_ADVERTISE_ADDRESS` (host:port, or host alone to use the bound port): set by the chart from
  the pod IP (downward API), so other pods reach this one directly, not through a Service;
- else the host of `--listen` with the bound port, a wildcard host (0.0.0.0, ::) replaced by
  `POD_IP` or this host's resolved name.
"""

from __future__ import annotations

import os
import socket

from flynn_runtime.ids import new_id


def new_replica_id(service: str) -> str:
    """A fresh id per process: a restarted replica is a new owner (its epochs start over)."""
    return new_id(f"{service}-r")


def advertise_address(listen: str, port: int) -> str:
    explicit = os.environ.get("FLYNN_ADVERTISE_ADDRESS", "").strip()
    if explicit:
        if explicit.rpartition(":")[2].isdigit() and not explicit.endswith("]"):
            return explicit
        return f"{explicit}:{port}"
    host = listen.rpartition(":")[0].strip("[]")
    if host in ("", "0.0.0.0", "::"):  # noqa: S104 - reading a wildcard, not binding one
        host = os.environ.get("POD_IP", "") or socket.gethostbyname(socket.gethostname())
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}"
