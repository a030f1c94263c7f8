"""Principals across config replicas: issue -> usable on another replica, revoke -> its stream ends.

    .venv/bin/python -m bench.principal_revocation [--rounds 20] [--setups sqlite,1,2]

Each setup runs config as real processes: `sqlite` is one replica on its SQLite data dir; `N` is N
replicas on one throwaway PostgreSQL (initdb + pg_ctl in a temp dir). Every round issues an operator
token through the first replica, then (on the LAST replica, i.e. another process when N >= 2):
- issue -> known: from IssueToken's answer until WhoAmI with the new token succeeds there;
- it opens a WatchConfig stream with the token, reads the snapshot, and the token is revoked through
  the first replica; revoke -> stream end: from sending RevokeToken until that stream ends with
  UNAUTHENTICATED (the bound the mesh promises is 1 s), and the RevokeToken round trip itself.
p50 / p99 / max over the rounds. Bounded: every wait has a timeout. The machine's load average is
printed with the figures; on a shared machine they are pessimistic.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] * 1000 if s else float("nan")


async def rounds(first: str, last: str, operator: str, service: str, n: int) -> dict[str, list[float]]:
    import grpc
    from flynn.v1 import config_pb2, config_pb2_grpc, principals_pb2, principals_pb2_grpc

    from flynn_runtime.channels import client_channel
    from tests.support.config import until_credential_pushed

    admin = (("authorization", f"Bearer {operator}"),)
    ch_a, ch_z = client_channel(first, ""), client_channel(last, "")
    pa, pz = principals_pb2_grpc.PrincipalsStub(ch_a), principals_pb2_grpc.PrincipalsStub(ch_z)
    out: dict[str, list[float]] = {"issue -> known": [], "revoke RTT": [], "revoke -> stream end": []}
    feed = pz.WatchPrincipals(
        principals_pb2.WatchPrincipalsRequest(),
        metadata=(("authorization", f"Bearer {service}"),),
        timeout=600,
    )
    await feed.read()
    try:
        for i in range(n):
            issued = await pa.IssueToken(
                principals_pb2.IssueTokenRequest(
                    name=f"bench-{i}", role=principals_pb2.PRINCIPAL_ROLE_OPERATOR
                ),
                metadata=admin,
                timeout=10,
            )
            t0 = time.monotonic()
            md = (("authorization", f"Bearer {issued.token}"),)
            # Known on the last replica when its WatchPrincipals snapshot carries the token's hash.
            await until_credential_pushed(feed, issued.principal.fingerprint, within=10)
            await pz.WhoAmI(principals_pb2.WhoAmIRequest(), metadata=md, timeout=5)
            out["issue -> known"].append(time.monotonic() - t0)
            watch = config_pb2_grpc.ConfigServiceStub(ch_z).WatchConfig(
                config_pb2.WatchConfigRequest(), metadata=md, timeout=30
            )
            await watch.read()

            async def end(call: grpc.aio.UnaryStreamCall) -> float:  # type: ignore[type-arg]
                with contextlib.suppress(grpc.aio.AioRpcError):
                    while await call.read() is not grpc.aio.EOF:  # type: ignore[attr-defined]
                        pass
                return time.monotonic()

            ending = asyncio.create_task(end(watch))
            sent = time.monotonic()
            await pa.RevokeToken(
                principals_pb2.RevokeTokenRequest(name=f"bench-{i}"), metadata=admin, timeout=10
            )
            out["revoke RTT"].append(time.monotonic() - sent)
            async with asyncio.timeout(10):
                ended = await ending
            code = await watch.code()
            if code != grpc.StatusCode.UNAUTHENTICATED:
                raise RuntimeError(f"the stream ended with {code}, not UNAUTHENTICATED")
            out["revoke -> stream end"].append(ended - sent)
    finally:
        feed.cancel()
        await ch_a.close(None)
        await ch_z.close(None)
    return out


def run(args: argparse.Namespace) -> None:
    sys.path[:0] = [str(ROOT), str(ROOT / "gen")]
    from bench.config_replicas import ConfigSetups, replica_count

    with ConfigSetups("flynn-bench-principals-") as setups:
        tokens = setups.tokens
        for spec in args.setups.split(","):
            sqlite = spec == "sqlite"
            n = replica_count(spec)
            with setups.started(spec, ["--log-level", "warning"]) as procs:
                label = "SQLite, 1 replica" if sqlite else f"PostgreSQL, {n} replica(s)"
                where = "the same replica" if n == 1 else "another replica"
                res = asyncio.run(
                    rounds(
                        procs[0].address,
                        procs[-1].address,
                        tokens.operator,
                        tokens.for_service("queue"),
                        args.rounds,
                    )
                )
                load = os.getloadavg()
                print(f"[{label}; stream and WhoAmI on {where}; {args.rounds} rounds; load {load[0]:.2f}]")
                for k, xs in res.items():
                    print(
                        f"  {k:<22} p50 {pct(xs, 0.5):7.1f} ms   p99 {pct(xs, 0.99):7.1f} ms   max {max(xs) * 1000:7.1f} ms"
                    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=20, help="issue/revoke rounds per setup (default 20)")
    p.add_argument("--setups", default="sqlite,1,2", help="sqlite and/or replica counts on PostgreSQL")
    run(p.parse_args())


if __name__ == "__main__":
    main()
