"""`flynn rollback <step>`: the rollout playbook's rollback steps, one audited config change each.

    flynn rollback queue      server.queue.mode collect; overrides and rollout removed
    flynn rollback reactions  automation.reactions emptied
    flynn rollback nodes      server.nodes.enabled false (connected nodes are disconnected live)
    flynn rollback canvas     server.nodes.feature_gates.ui.canvas false and its rollout cleared
    flynn rollback voice      tts.enabled and audio.enabled false, their rollouts cleared

Each is exactly one UpdateConfig (field mask = the keys above, a masked key left empty is cleared),
with the reason recorded in the history ("rollback playbook: <step>" plus --reason). It prints the new
revision, then waits (bounded by --wait) until every connected watcher in ListWatchers reports that
revision, and names the ones that did not. Exit 0 when all did, 1 otherwise (the change is committed
either way), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Any

import grpc
from flynn.v1 import config_pb2, config_pb2_grpc
from google.protobuf import field_mask_pb2

from flynn_cli import rpc


@dataclass(frozen=True)
class Step:
    name: str
    summary: str
    paths: tuple[str, ...]

    def config(self) -> config_pb2.FlynnConfig:
        cfg = config_pb2.FlynnConfig()
        if self.name == "queue":
            cfg.server.queue.mode = config_pb2.QUEUE_MODE_COLLECT
        # Every other step sets booleans to false / lists to empty: the masked paths left unset.
        return cfg


STEPS = {
    s.name: s
    for s in (
        Step(
            "queue",
            "server.queue.mode collect, queue overrides and rollout removed",
            ("server.queue.mode", "server.queue.overrides", "server.queue.rollout"),
        ),
        Step("reactions", "automation.reactions emptied", ("automation.reactions",)),
        Step("nodes", "server.nodes.enabled false (live disconnect)", ("server.nodes.enabled",)),
        Step(
            "canvas",
            "server.nodes.feature_gates.ui.canvas false, canvas rollout cleared",
            ("server.nodes.feature_gates.ui.canvas", "server.nodes.feature_gates.ui.canvas_rollout"),
        ),
        Step(
            "voice",
            "tts.enabled false, audio.enabled false, their rollouts cleared",
            ("tts.enabled", "tts.rollout", "audio.enabled", "audio.rollout"),
        ),
    )
}
MAX_ATTEMPTS = 3  # a concurrent writer moved the head: read it again and retry


def register(sub: Any) -> None:
    p = sub.add_parser("rollback", help="rollback playbook steps: queue, reactions, nodes, canvas, voice")
    cmds = p.add_subparsers(dest="step", metavar="<step>")
    cmds.required = True
    for step in STEPS.values():
        c = cmds.add_parser(step.name, help=step.summary)
        c.add_argument("--reason", default="", help="why (kept in the history with the playbook step)")
        c.add_argument(
            "--wait", type=float, default=10.0, help="seconds to wait for every watcher (default 10)"
        )
        c.add_argument("--dry-run", action="store_true", help="show the diff without committing")
        c.set_defaults(func=cmd_rollback)


def _stub(args: argparse.Namespace) -> config_pb2_grpc.ConfigServiceStub:
    return config_pb2_grpc.ConfigServiceStub(rpc.channel(args))


def _kw(args: argparse.Namespace) -> dict[str, Any]:
    return {"metadata": rpc.metadata(args), "timeout": args.timeout}


def apply_step(args: argparse.Namespace, step: Step) -> config_pb2.UpdateConfigResponse | None:
    stub = _stub(args)
    reason = f"rollback playbook: {step.name} ({step.summary})"
    if args.reason.strip():
        reason += f": {args.reason.strip()}"
    for attempt in range(MAX_ATTEMPTS):
        head = rpc.call(lambda: stub.GetConfig(config_pb2.GetConfigRequest(), **_kw(args)))
        if head is None:
            return None
        req = config_pb2.UpdateConfigRequest(
            config=step.config(),
            update_mask=field_mask_pb2.FieldMask(paths=list(step.paths)),
            expected_revision=head.revision,
            reason=reason,
            dry_run=args.dry_run,
        )
        try:
            resp: config_pb2.UpdateConfigResponse = stub.UpdateConfig(req, **_kw(args))
            return resp
        except grpc.RpcError as e:
            stale = isinstance(e, grpc.Call) and e.code() in (
                grpc.StatusCode.ABORTED,
                grpc.StatusCode.FAILED_PRECONDITION,
            )
            if stale and attempt + 1 < MAX_ATTEMPTS:
                continue
            rpc.print_error(e)
            return None
    return None


def wait_applied(
    args: argparse.Namespace, revision: int, wait: float
) -> tuple[float, list[str], list[str], list[str]]:
    """(seconds waited, instances at the revision, connected instances behind, disconnected instances)."""
    stub = _stub(args)
    start = time.monotonic()
    deadline = start + max(wait, 0.0)
    done: list[str] = []
    behind: list[str] = []
    gone: list[str] = []
    while True:
        rows: list[config_pb2.WatcherStatus] = []
        token = ""
        ok = True
        for _ in range(100):
            try:
                resp = stub.ListWatchers(
                    config_pb2.ListWatchersRequest(page_size=1000, page_token=token), **_kw(args)
                )
            except grpc.RpcError:
                ok = False
                break
            rows.extend(resp.watchers)
            token = resp.next_page_token
            if not token:
                break
        if ok:
            done = [name(w) for w in rows if w.applied_revision >= revision]
            behind = [name(w) for w in rows if w.connected and w.applied_revision < revision]
            gone = [name(w) for w in rows if not w.connected and w.applied_revision < revision]
            if not behind:
                return time.monotonic() - start, done, behind, gone
        if time.monotonic() >= deadline:
            return time.monotonic() - start, done, behind, gone
        time.sleep(0.05)


def name(w: config_pb2.WatcherStatus) -> str:
    return f"{w.identity.service}/{w.identity.instance_id}"


def cmd_rollback(args: argparse.Namespace) -> int:
    step = STEPS[args.step]
    resp = apply_step(args, step)
    if resp is None:
        return 1
    if resp.dry_run:
        print(f"dry run against revision {resp.revision}: {len(resp.diff)} change(s), nothing committed")
        for d in resp.diff:
            print(f"  {d.path}: {d.old_value or '(unset)'} -> {d.new_value or '(unset)'}")
        return 0
    if resp.unchanged:
        print(f"rollback {step.name}: already in effect (head stays at revision {resp.revision})")
    else:
        print(f"rollback {step.name}: committed revision {resp.revision} ({len(resp.diff)} change(s))")
        for d in resp.diff:
            print(f"  {d.path}: {d.old_value or '(unset)'} -> {d.new_value or '(unset)'}")
    waited, done, behind, gone = wait_applied(args, resp.revision, args.wait)
    if behind:
        print(
            f"NOT applied everywhere after {waited:.2f} s: behind: {', '.join(sorted(behind))}",
            file=sys.stderr,
        )
    else:
        print(f"applied by every connected watcher ({len(done)}) in {waited:.2f} s")
    if gone:
        print(f"not connected (will apply on reconnect): {', '.join(sorted(gone))}")
    return 1 if behind else 0
