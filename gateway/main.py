"""The gateway process: `python -m gateway.main` (console script flynn-gateway)."""

from __future__ import annotations

import argparse
import os

from flynn_runtime import settings
from flynn_runtime.server import run_service
from gateway.app import GatewayApp


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--metrics-addrs",
        default=os.environ.get("FLYNN_METRICS_ADDRS", ""),
        help="Prometheus host:port of each service for System.GetMetrics, e.g. "
        "config=h:p,queue=h:p,reactions=h:p,nodes=h:p,voice=h:p (FLYNN_METRICS_ADDRS)",
    )
    p.add_argument(
        "--gateway-config-file",
        default=os.environ.get("FLYNN_GATEWAY_CONFIG_FILE", ""),
        help="YAML FlynnConfig used instead of watching the config service (FLYNN_GATEWAY_CONFIG_FILE; "
        "for tools and tests without the mesh)",
    )


def main() -> None:
    run_service(settings.parse("gateway", add_args=add_args), GatewayApp)


if __name__ == "__main__":
    main()
