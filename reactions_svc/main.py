"""Entry point of the reactions service process (flynn-reactions / python -m reactions_svc.main)."""

from __future__ import annotations

from flynn_runtime import settings
from flynn_runtime.server import run_service
from reactions_svc.app import ReactionsApp, add_args


def main() -> None:
    run_service(settings.parse("reactions", add_args=add_args), ReactionsApp)


if __name__ == "__main__":
    main()
