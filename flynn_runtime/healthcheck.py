"""`flynn-healthcheck`: wait until gRPC health checks report SERVING (the chart's `helm test` hook).

    flynn-healthcheck --timeout 60 flynn-config:50051/flynn.v1.ConfigService flynn-gateway:50050/

Each target is `host:port/<service name>` (an empty name, or no slash, checks the server as a whole).
Every target is polled until it answers SERVING or the shared deadline passes; the exit status is 0
only when all of them did. One line per target tells the outcome.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flynn_runtime.tls import caller_credentials


@dataclass(frozen=True)
class Target:
    address: str
    service: str

    @classmethod
    def parse(cls, text: str) -> Target:
        address, _, service = text.partition("/")
        if not address or ":" not in address:
            raise argparse.ArgumentTypeError(f"{text!r}: expected host:port[/service]")
        return cls(address, service)

    def __str__(self) -> str:
        return f"{self.address}/{self.service}"


def check(
    target: Target,
    deadline: float,
    interval: float = 1.0,
    credentials: grpc.ChannelCredentials | None = None,
) -> tuple[bool, str]:
    """Poll one target until SERVING or the deadline; returns (ok, last status or error)."""
    last = "no answer"
    channel_ = (
        grpc.insecure_channel(target.address)
        if credentials is None
        else grpc.secure_channel(target.address, credentials)
    )
    with channel_ as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            remaining = deadline - time.monotonic()
            try:
                resp = stub.Check(
                    health_pb2.HealthCheckRequest(service=target.service),
                    timeout=max(min(remaining, 5.0), 0.5),
                )
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return True, last
            except grpc.RpcError as e:
                last = f"{e.code().name}: {e.details()}"
            if time.monotonic() + interval > deadline:
                return False, last
            time.sleep(interval)


def run(targets: Sequence[Target], timeout: float, credentials: grpc.ChannelCredentials | None = None) -> int:
    deadline = time.monotonic() + timeout
    failed = 0
    for target in targets:
        ok, status = check(target, deadline, credentials=credentials)
        print(f"{'ok  ' if ok else 'FAIL'} {target} {status}", flush=True)
        failed += not ok
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="flynn-healthcheck", description="wait for gRPC health SERVING")
    parser.add_argument("targets", nargs="+", type=Target.parse, help="host:port/<grpc service name>")
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="overall deadline in seconds (default 60)"
    )
    parser.add_argument(
        "--tls-ca-file",
        default=os.environ.get("FLYNN_HEALTHCHECK_CA_FILE", ""),
        help="CA of TLS targets; with it every target is called over TLS (FLYNN_HEALTHCHECK_CA_FILE)",
    )
    parser.add_argument(
        "--tls-cert-file",
        default=os.environ.get("FLYNN_HEALTHCHECK_CERT_FILE", ""),
        help="client certificate for targets that require one (mutual TLS) (FLYNN_HEALTHCHECK_CERT_FILE)",
    )
    parser.add_argument(
        "--tls-key-file",
        default=os.environ.get("FLYNN_HEALTHCHECK_KEY_FILE", ""),
        help="private key of --tls-cert-file (FLYNN_HEALTHCHECK_KEY_FILE)",
    )
    args = parser.parse_args(argv)
    if args.tls_ca_file and not os.path.exists(args.tls_ca_file):
        credentials: grpc.ChannelCredentials | None = grpc.ssl_channel_credentials()  # the system's roots
    else:
        credentials = caller_credentials(args.tls_ca_file, args.tls_cert_file, args.tls_key_file)
    sys.exit(run(args.targets, args.timeout, credentials))


if __name__ == "__main__":
    main()
