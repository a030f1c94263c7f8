"""Entry point: python -m nodes_svc.main (serves flynn.v1.Nodes and flynn.v1.Canvas)."""

from __future__ import annotations

from flynn_runtime import settings
from flynn_runtime.server import run_service
from nodes_svc.app import NodesApp, add_args


def main() -> None:
    run_service(settings.parse("nodes", add_args=add_args), NodesApp)


if __name__ == "__main__":
    main()
