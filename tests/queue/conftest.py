"""Run-control tests: fixtures come from tests/conftest.py (tokens), tests/support/queue.py (servers)
and tests/support/postgres.py (a real PostgreSQL 15).

Every test here runs against both store backends: `sqlite` (the embedded default) and `postgresql`
(a fresh database on the session's real server, given to the service as FLYNN_DATABASE_URL, which
in-process servers and service processes both read). A test about one backend only says so with
`@pytest.mark.backends("postgresql")`.
"""

from __future__ import annotations

import pytest

BACKENDS = ("sqlite", "postgresql")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "queue_backend" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("backends")
        names = list(marker.args) if marker is not None else list(BACKENDS)
        unknown = set(names) - set(BACKENDS)
        if unknown:
            raise ValueError(f"unknown backends {sorted(unknown)} in {metafunc.definition.nodeid}")
        metafunc.parametrize("queue_backend", names, indirect=True)


@pytest.fixture(autouse=True)
def queue_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    backend = str(request.param)
    if backend == "postgresql":
        monkeypatch.setenv("FLYNN_DATABASE_URL", str(request.getfixturevalue("postgres_url")))
    else:
        monkeypatch.delenv("FLYNN_DATABASE_URL", raising=False)
    return backend
