"""Entry point of the config service process (flynn-config / python -m config_svc.main)."""

from __future__ import annotations

from config_svc.app import ConfigApp, add_args
from flynn_runtime import settings
from flynn_runtime.server import run_service


def main() -> None:
    run_service(settings.parse("config", add_args=add_args), ConfigApp)


if __name__ == "__main__":
    main()
