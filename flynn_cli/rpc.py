"""What every CLI group shares: a channel with the bearer token, and readable error output."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TypeVar

import grpc

from flynn_runtime.rich_status import from_rpc_error
from flynn_runtime.tls import caller_credentials

T = TypeVar("T")


def channel(args: argparse.Namespace) -> grpc.Channel:
    credentials = caller_credentials(getattr(args, "cacert", "") or "")
    if credentials is None:
        return grpc.insecure_channel(args.addr)
    return grpc.secure_channel(args.addr, credentials)


def metadata(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {args.token}"),) if args.token else ()


def print_error(err: grpc.RpcError) -> None:
    rich = None
    try:
        rich = from_rpc_error(err)
    except Exception:  # noqa: BLE001 - a status without rich details is printed plainly below
        rich = None
    code = err.code().name if isinstance(err, grpc.Call) else "ERROR"
    details = err.details() if isinstance(err, grpc.Call) else str(err)
    print(f"error: {code}: {details}", file=sys.stderr)
    if rich is None:
        return
    if rich.violations:
        print("invalid fields:", file=sys.stderr)
        for v in rich.violations:
            print(f"  - {v.field}: {v.description}", file=sys.stderr)
    if rich.reason:
        meta = ", ".join(f"{k}={v}" for k, v in sorted(rich.metadata.items()))
        print(f"reason: {rich.reason}" + (f" ({meta})" if meta else ""), file=sys.stderr)


def call(fn: Callable[[], T]) -> T | None:
    """Run one RPC; print a failure and return None."""
    try:
        return fn()
    except grpc.RpcError as e:
        print_error(e)
        return None
