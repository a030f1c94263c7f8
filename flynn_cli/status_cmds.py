"""`flynn status`: every service's health and the replicas of the stateful ones (System.GetStatus).

    flynn status            # a service table, then every replica as it recorded itself in its database
    flynn status --json     # the GetStatus answer as JSON

A replica is READY, NOT_READY (heart-beating without its liveness lease) or GONE (no heartbeat within
its lease, or stopped); GONE rows stay listed for an hour. Exit 0 when every deployed service is
SERVING, 1 otherwise or when the call failed.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from typing import Any

from flynn.v1 import system_pb2, system_pb2_grpc
from google.protobuf import json_format

from flynn_cli import rpc
from flynn_runtime.enum_names import short_name

Rows = list[tuple[str, ...]]

REPLICA_HEADER = ("", "service", "process", "replica id", "address", "state", "heartbeat", "lease", "holds")


def register(sub: Any) -> None:
    p = sub.add_parser("status", help="every service's health and the replicas of the stateful ones")
    p.add_argument("--json", action="store_true", help="print the GetStatus answer as JSON")
    p.set_defaults(func=cmd_status)


def replica_rows(resp: system_pb2.GetStatusResponse, processes: Mapping[str, str] | None = None) -> Rows:
    """One row per replica of each stateful service; `processes` names a local process by its address
    (flynn-dev's "config-2"), "-" otherwise."""
    by_address = dict(processes or {})
    rows: Rows = []
    for s in resp.services:
        for r in s.replicas:
            holds = ", ".join(f"{h.name}={h.value:g}" for h in r.holdings)
            rows.append(
                (
                    "replica",
                    s.service,
                    by_address.get(r.address, "-"),
                    r.replica_id,
                    r.address,
                    short_name(system_pb2.ReplicaState, r.state, lower=False),
                    f"{r.heartbeat_age_seconds:.1f}s ago",
                    "held" if r.lease_held else "lost",
                    holds + (f" ({r.detail})" if r.detail else ""),
                )
            )
        if s.replicas_detail:
            rows.append(("replica", s.service, "-", "-", "-", "?", "-", "-", s.replicas_detail))
    return rows


def print_table(table: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def cmd_status(args: argparse.Namespace) -> int:
    stub = system_pb2_grpc.SystemStub(rpc.channel(args))
    resp = rpc.call(
        lambda: stub.GetStatus(
            system_pb2.GetStatusRequest(), metadata=rpc.metadata(args), timeout=args.timeout
        )
    )
    if resp is None:
        return 1
    if args.json:
        print(json.dumps(json_format.MessageToDict(resp), indent=2))
    else:
        rows = [("service", "address", "health", "config rev", "version", "detail")]
        for s in resp.services:
            health = short_name(system_pb2.ServiceHealth, s.health, lower=False)
            rev = str(s.applied_revision) if s.applied_revision else "-"
            rows.append((s.service, s.address or "-", health, rev, s.version or "-", s.detail))
        print_table(rows)
        print(f"config head revision: {resp.head_revision or 'unknown'}")
        replicas = replica_rows(resp)
        if replicas:
            print(
                "\nreplicas, as each recorded itself in its database (GONE: no heartbeat within its lease):"
            )
            print_table([REPLICA_HEADER, *replicas])
    ok = {system_pb2.SERVICE_HEALTH_SERVING, system_pb2.SERVICE_HEALTH_NOT_DEPLOYED}
    return 0 if all(s.health in ok for s in resp.services) else 1
