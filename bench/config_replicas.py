"""Config-service processes for the benchmarks that compare setups: "sqlite" (one process on its
SQLite files) or "N" (N replicas on a fresh database of a throwaway PostgreSQL, started on first use).

    with ConfigSetups("flynn-bench-x-") as setups:      # a temp dir (setups.base) and tokens
        for spec in "sqlite,1,2".split(","):
            with setups.started(spec, ["--log-level", "warning"]) as procs: ...
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from flynn_launcher.local_postgres import LocalPostgres
from tests.support.mesh import ServiceProcess, Tokens, make_tokens


def replica_count(spec: str) -> int:
    """How many config processes a setup runs: 1 for "sqlite", else the number it names."""
    return 1 if spec == "sqlite" else int(spec)


class ConfigSetups:
    def __init__(self, prefix: str) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix=prefix)
        self.base = Path(self._tmp.name)
        self.base.chmod(0o755)  # PostgreSQL runs as its own user below it
        self.tokens: Tokens = make_tokens(self.base)
        self._pg: LocalPostgres | None = None

    def database_args(self, spec: str) -> list[str]:
        """--database-url of a fresh database for setup `spec` ([] on SQLite)."""
        if spec == "sqlite":
            return []
        if self._pg is None:
            self._pg = LocalPostgres(self.base / "pg")
            self._pg.init()
            self._pg.start()
        return ["--database-url", self._pg.create_database(f"bench_{replica_count(spec)}")]

    @contextlib.contextmanager
    def started(self, spec: str, extra: list[str]) -> Iterator[list[ServiceProcess]]:
        """The setup's config processes, started (60 s each at most) and stopped on leaving."""
        db = self.database_args(spec)
        procs = [
            ServiceProcess(
                "config",
                "config_svc.main",
                self.base / f"config-{spec}-{i}",
                self.tokens,
                extra=[*extra, *db],
            )  # fmt: skip
            for i in range(replica_count(spec))
        ]
        try:
            for p in procs:
                p.start(timeout=60)
            yield procs
        finally:
            for p in procs:
                with contextlib.suppress(Exception):
                    p.stop()

    def __enter__(self) -> ConfigSetups:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if self._pg is not None:
                self._pg.stop("immediate")
        finally:
            self._tmp.cleanup()
