"""Entry point of the `flynn` command: global flags, then one sub-command group per area.

A group is a module with `register(subparsers)` that adds its parser and sets `func(args) -> int`
on each leaf command; add yours to GROUPS.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

from flynn_cli import canvas_cmds, config_cmds, db_cmds, gates_cmds, playbook_cmds, status_cmds, tokens_cmds

GROUPS: list[ModuleType] = [
    status_cmds,
    config_cmds,
    gates_cmds,
    playbook_cmds,
    tokens_cmds,
    canvas_cmds,
    db_cmds,
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flynn", description="Operate a Flynn mesh over its gRPC API.")
    p.add_argument(
        "--addr",
        default=os.environ.get("FLYNN_ADDR", "127.0.0.1:50050"),
        help="host:port of the gateway (or of a service directly) (FLYNN_ADDR; default 127.0.0.1:50050)",
    )
    p.add_argument("--token", default=os.environ.get("FLYNN_TOKEN", ""), help="bearer token (FLYNN_TOKEN)")
    p.add_argument(
        "--cacert",
        default=os.environ.get("FLYNN_CACERT", ""),
        help="CA of a gateway serving TLS, e.g. .flynn-data/tls/ca.pem after `flynn-dev up --tls`; "
        "without it the call is plaintext (FLYNN_CACERT)",
    )
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per call (default 10)")
    sub = p.add_subparsers(dest="group", metavar="<group>")
    sub.required = True
    for group in GROUPS:
        group.register(sub)
    return p


# Exit status when the reader of our output went away (`flynn gates check --json | head`): what a
# process killed by SIGPIPE reports in a shell, as `cat`, `grep` or `git` would.
EXIT_CLOSED_PIPE = 128 + 13


def main(argv: Sequence[str] | None = None) -> None:
    """Every `flynn` command runs here: a closed stdout ends the command quietly, never a traceback."""
    try:
        code = run(argv)
        sys.stdout.flush()  # inside the try: a closed pipe is found here, not at interpreter exit
    except BrokenPipeError:
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        sys.exit(EXIT_CLOSED_PIPE)
    sys.exit(code)


def run(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.parse_args([*(argv or sys.argv[1:]), "--help"])
        return 2
    return func(args)


if __name__ == "__main__":
    main()
