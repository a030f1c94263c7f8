"""flynn-queue: the run-control service process."""

from __future__ import annotations

from flynn_runtime import settings
from flynn_runtime.server import run_service
from queue_svc.app import QueueApp, add_args


def main() -> None:
    run_service(settings.parse("queue", add_args=add_args), QueueApp)


if __name__ == "__main__":
    main()
