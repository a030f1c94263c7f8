"""`flynn config ...`: read, change, roll back and explain the runtime config over ConfigService."""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml
from flynn.v1 import config_pb2, config_pb2_grpc
from google.protobuf import field_mask_pb2

from flynn_cli import rpc
from flynn_runtime import config_yaml
from flynn_runtime.enum_names import short_names

_SOURCES = short_names(config_pb2.ValueSource)
_KINDS = short_names(config_pb2.ConfigRevisionKind)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "config", help="runtime config: get, set, apply, diff, history, rollback, explain, watchers"
    )
    cmds = p.add_subparsers(dest="command", metavar="<command>")
    cmds.required = True

    c = cmds.add_parser("get", help="print the config (or one dotted key) as YAML")
    c.add_argument("key", nargs="?", default="", help="dotted key, e.g. server.queue.mode")
    c.add_argument("--revision", type=int, default=0, help="an older revision (default: the head)")
    c.set_defaults(func=cmd_get)

    c = cmds.add_parser(
        "set",
        help="set one dotted key (the value is YAML: interrupt, true, [a, b], 2s); "
        "a map entry is written as path[key], e.g. server.queue.overrides.sessions[telegram:42]",
    )
    c.add_argument("key")
    c.add_argument("value")
    _change_flags(c)
    c.set_defaults(func=cmd_set)

    c = cmds.add_parser(
        "unset", help="clear a dotted key back to its default, or remove a map entry path[key]"
    )
    c.add_argument("key")
    _change_flags(c)
    c.set_defaults(func=cmd_unset)

    c = cmds.add_parser("apply", help="replace the whole config with a YAML file")
    c.add_argument("file", type=Path)
    _change_flags(c)
    c.set_defaults(func=cmd_apply)

    c = cmds.add_parser("diff", help="show what applying a YAML file would change (dry run)")
    c.add_argument("file", type=Path)
    c.set_defaults(func=cmd_diff)

    c = cmds.add_parser("history", help="list revisions, newest first")
    c.add_argument("--limit", type=int, default=20, help="most revisions to show (default 20)")
    c.add_argument("--diff", action="store_true", help="show each revision's changes")
    c.set_defaults(func=cmd_history)

    c = cmds.add_parser("rollback", help="write a new revision restoring an older one")
    c.add_argument("revision", type=int)
    _change_flags(c)
    c.set_defaults(func=cmd_rollback)

    c = cmds.add_parser("explain", help="effective value of a key for a session/channel/node, and why")
    c.add_argument(
        "key",
        help="server.queue.mode, tts.enabled, audio.enabled, server.nodes.feature_gates.ui.canvas, "
        "automation.reactions.<rule id>, or any field path",
    )
    c.add_argument("--session", default="", help="session key")
    c.add_argument("--channel", default="", help="channel")
    c.add_argument("--node", default="", help="node id")
    c.add_argument("--revision", type=int, default=0)
    c.add_argument(
        "--sessions-file",
        default="",
        help="bulk form: a file of session keys, one per line ('-' reads stdin); one call answers "
        "all of them (at most 5000), one row each: session, value, source, bucket",
    )
    c.add_argument("--json", action="store_true", help="with --sessions-file: one JSON object per line")
    c.set_defaults(func=cmd_explain)

    c = cmds.add_parser("watchers", help="service instances watching the config and the revision each runs")
    c.set_defaults(func=cmd_watchers)


def _change_flags(c: argparse.ArgumentParser) -> None:
    c.add_argument("--reason", default="", help="why (kept in the history; required unless --dry-run)")
    c.add_argument("--dry-run", action="store_true", help="validate and show the diff without committing")
    c.add_argument(
        "--expected-revision",
        type=int,
        default=0,
        help="refuse when the head is not this revision (default: read it)",
    )


def _stub(args: argparse.Namespace) -> config_pb2_grpc.ConfigServiceStub:
    return config_pb2_grpc.ConfigServiceStub(rpc.channel(args))


def _kw(args: argparse.Namespace) -> dict[str, Any]:
    return {"metadata": rpc.metadata(args), "timeout": args.timeout}


def _need_reason(args: argparse.Namespace) -> bool:
    if not args.dry_run and not args.reason.strip():
        print("error: --reason is required (it is kept in the history)", file=sys.stderr)
        return False
    return True


def _parse_error(e: config_yaml.ConfigParseError, what: str) -> int:
    print(f"error: {what} is not a valid config:", file=sys.stderr)
    for v in e.violations:
        print(f"  - {v.field}: {v.description}", file=sys.stderr)
    return 1


def _print_diff(diff: Any, indent: str = "  ") -> None:
    for d in diff:
        old = d.old_value or "(unset)"
        new = d.new_value or "(unset)"
        print(f"{indent}{d.path}: {old} -> {new}")


def _head(args: argparse.Namespace) -> int | None:
    if args.expected_revision:
        return int(args.expected_revision)
    resp = rpc.call(lambda: _stub(args).GetConfig(config_pb2.GetConfigRequest(), **_kw(args)))
    return None if resp is None else int(resp.revision)


def _report_change(resp: Any, verb: str) -> int:
    if resp.unchanged:
        print(f"no change: the config already equals this (head stays at revision {resp.revision})")
        return 0
    if resp.dry_run:
        print(f"dry run against revision {resp.revision}: {len(resp.diff)} change(s), nothing committed")
    else:
        print(f"{verb} revision {resp.revision}: {len(resp.diff)} change(s)")
    _print_diff(resp.diff)
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    resp = rpc.call(
        lambda: _stub(args).GetConfig(config_pb2.GetConfigRequest(revision=args.revision), **_kw(args))
    )
    if resp is None:
        return 1
    try:
        value = config_yaml.value_at(resp.config, args.key)
    except KeyError:
        print(f"error: {args.key!r} is not a config key", file=sys.stderr)
        return 1
    print(f"# revision {resp.revision}")
    if isinstance(value, dict | list):
        sys.stdout.write(yaml.safe_dump(value, sort_keys=False, allow_unicode=True))
    else:
        print(
            yaml.safe_dump(value, allow_unicode=True, default_flow_style=True).removesuffix("\n...\n").strip()
        )
    return 0


def _update(
    args: argparse.Namespace, cfg: config_pb2.FlynnConfig, paths: list[str], head: int | None = None
) -> int:
    if not _need_reason(args):
        return 2
    if head is None:
        head = _head(args)
    if head is None:
        return 1
    req = config_pb2.UpdateConfigRequest(
        config=cfg,
        update_mask=field_mask_pb2.FieldMask(paths=paths),
        expected_revision=head,
        reason=args.reason,
        dry_run=args.dry_run,
    )
    resp = rpc.call(lambda: _stub(args).UpdateConfig(req, **_kw(args)))
    return 1 if resp is None else _report_change(resp, "committed")


_MAP_ENTRY = re.compile(r"^(?P<path>[A-Za-z0-9_.]+)\[(?P<key>.+)\]$")


def _map_entry_update(args: argparse.Namespace, path: str, key: str, value: Any, remove: bool) -> int:
    """`path[key]`: read the head, change one entry of the map, write the whole map back (with the head's
    revision as expected_revision, so a concurrent change is refused rather than overwritten)."""
    if not _need_reason(args):
        return 2
    resp = rpc.call(lambda: _stub(args).GetConfig(config_pb2.GetConfigRequest(), **_kw(args)))
    if resp is None:
        return 1
    try:
        current = config_yaml.value_at(resp.config, path)
    except KeyError:
        current = None
    if not isinstance(current, dict):
        print(f"error: {path!r} is not a map field (only maps take [key])", file=sys.stderr)
        return 1
    if remove:
        if key not in current:
            print(f"no change: {path} has no entry {key!r}")
            return 0
        del current[key]
    else:
        current[key] = value
    try:
        cfg = config_yaml.dict_to_config({path: current})
    except config_yaml.ConfigParseError as e:
        return _parse_error(e, "the value")
    head = args.expected_revision or int(resp.revision)
    return _update(args, cfg, [path], head)


def _parse_value(text: str) -> tuple[bool, Any]:
    try:
        return True, yaml.safe_load(text)
    except yaml.YAMLError as e:
        print(f"error: the value is not YAML: {e}", file=sys.stderr)
        return False, None


def cmd_set(args: argparse.Namespace) -> int:
    ok, value = _parse_value(args.value)
    if not ok:
        return 1
    m = _MAP_ENTRY.match(args.key)
    if m:
        return _map_entry_update(args, m["path"], m["key"], value, remove=False)
    try:
        cfg = config_yaml.dict_to_config({args.key: value})
    except config_yaml.ConfigParseError as e:
        return _parse_error(e, "the value")
    return _update(args, cfg, [args.key])


def cmd_unset(args: argparse.Namespace) -> int:
    m = _MAP_ENTRY.match(args.key)
    if m:
        return _map_entry_update(args, m["path"], m["key"], None, remove=True)
    # The key in the mask with nothing set in the request clears it (back to its default).
    return _update(args, config_pb2.FlynnConfig(), [args.key])


def _load_file(path: Path) -> config_pb2.FlynnConfig | int:
    try:
        return config_yaml.yaml_to_config(path.read_text(encoding="utf-8"))
    except OSError as e:
        print(f"error: cannot read {path}: {e}", file=sys.stderr)
        return 1
    except config_yaml.ConfigParseError as e:
        return _parse_error(e, str(path))


def cmd_apply(args: argparse.Namespace) -> int:
    cfg = _load_file(args.file)
    if isinstance(cfg, int):
        return cfg
    return _update(args, cfg, list(config_yaml.TOP_LEVEL_PATHS))


def cmd_diff(args: argparse.Namespace) -> int:
    args.dry_run, args.reason, args.expected_revision = True, "diff", 0
    return cmd_apply(args)


def _list_revisions(
    args: argparse.Namespace, req: config_pb2.ListRevisionsRequest
) -> config_pb2.ListRevisionsResponse | None:
    return rpc.call(lambda: _stub(args).ListRevisions(req, **_kw(args)))


def _list_watchers(
    args: argparse.Namespace, req: config_pb2.ListWatchersRequest
) -> config_pb2.ListWatchersResponse | None:
    return rpc.call(lambda: _stub(args).ListWatchers(req, **_kw(args)))


def cmd_history(args: argparse.Namespace) -> int:
    if args.limit <= 0:
        print("error: --limit must be positive", file=sys.stderr)
        return 2
    shown, token = 0, ""
    print(f"{'REV':>6}  {'TIME (UTC)':<19}  {'KIND':<8}  {'ACTOR':<22}  {'CHANGES':>7}  REASON")
    while shown < args.limit:
        req = config_pb2.ListRevisionsRequest(page_size=min(args.limit - shown, 500), page_token=token)
        resp = _list_revisions(args, req)
        if resp is None:
            return 1
        for r in resp.revisions:
            when = datetime.datetime.fromtimestamp(r.create_time.seconds, datetime.UTC).strftime(
                "%Y-%m-%d %H:%M:%S"
            )
            kind = _KINDS.get(r.kind, str(r.kind))
            if r.restored_revision:
                kind += f"->{r.restored_revision}"
            print(f"{r.revision:>6}  {when:<19}  {kind:<8}  {r.actor:<22}  {len(r.diff):>7}  {r.reason}")
            if args.diff:
                _print_diff(r.diff, indent="          ")
            shown += 1
        token = resp.next_page_token
        if not token:
            break
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    if not _need_reason(args):
        return 2
    req = config_pb2.RollbackConfigRequest(
        to_revision=args.revision,
        expected_revision=args.expected_revision,
        reason=args.reason,
        dry_run=args.dry_run,
    )
    resp = rpc.call(lambda: _stub(args).RollbackConfig(req, **_kw(args)))
    return 1 if resp is None else _report_change(resp, f"rolled back to revision {args.revision} as")


def _session_keys(path: str) -> list[str]:
    text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _print_sessions(resp: config_pb2.ExplainConfigResponse, as_json: bool) -> None:
    if as_json:
        for e in resp.sessions:
            row = {
                "session": e.session_key,
                "value": json.loads(e.value) if e.value else None,
                "source": _SOURCES.get(e.source, str(e.source)),
                "bucket": e.bucket if e.hashed_key else None,
                "revision": e.revision,
            }
            print(json.dumps(row))
        return
    print(f"{resp.key} at revision {resp.revision}, {len(resp.sessions)} session(s)")
    print(f"{'SESSION':<32} {'VALUE':<24} {'SOURCE':<18} BUCKET")
    for e in resp.sessions:
        bucket = str(e.bucket) if e.hashed_key else "-"
        print(f"{e.session_key:<32} {e.value:<24} {_SOURCES.get(e.source, str(e.source)):<18} {bucket}")


def cmd_explain(args: argparse.Namespace) -> int:
    req = config_pb2.ExplainConfigRequest(
        key=args.key,
        session_key=args.session,
        channel=args.channel,
        node_id=args.node,
        revision=args.revision,
    )
    if args.sessions_file:
        req.session_keys.extend(_session_keys(args.sessions_file))
    resp = rpc.call(lambda: _stub(args).ExplainConfig(req, **_kw(args)))
    if resp is None:
        return 1
    if args.sessions_file:
        _print_sessions(resp, args.json)
        return 0
    print(f"{resp.key} = {resp.value}")
    print(f"  source:      {_SOURCES.get(resp.source, resp.source)}")
    print(f"  why:         {resp.explanation}")
    if resp.hashed_key:
        print(
            f"  rollout:     bucket {resp.bucket} of hashed key {resp.hashed_key!r}, {resp.basis_points} basis points"
        )
    print(f"  revision:    {resp.revision}")
    return 0


def cmd_watchers(args: argparse.Namespace) -> int:
    token, head = "", 0
    rows: list[config_pb2.WatcherStatus] = []
    for _ in range(100):
        req = config_pb2.ListWatchersRequest(page_size=1000, page_token=token)
        resp = _list_watchers(args, req)
        if resp is None:
            return 1
        rows.extend(resp.watchers)
        head = resp.head_revision
        token = resp.next_page_token
        if not token:
            break
    print(f"head revision {head}; {len(rows)} instance(s)")
    print(f"{'SERVICE':<12} {'INSTANCE':<28} {'CONNECTED':<9} {'APPLIED':>7}  {'LAST NACK':<30} PEER")
    for w in rows:
        nack = f"{w.last_nack_revision}: {w.last_nack_reason}" if w.last_nack_revision else "-"
        behind = "" if w.applied_revision >= head else " (behind)"
        print(
            f"{w.identity.service:<12} {w.identity.instance_id:<28} {'yes' if w.connected else 'no':<9} "
            f"{w.applied_revision:>7}{behind}  {nack[:60]:<30} {w.peer}"
        )
    return 0
