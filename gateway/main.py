"""The gateway process: `python -m gateway.main` (console script flynn-gateway)."""

from __future__ import annotations

from flynn_runtime import settings
from flynn_runtime.server import run_service
from gateway.app import GatewayApp


def main() -> None:
    run_service(settings.parse("gateway"), GatewayApp)


if __name__ == "__main__":
    main()
