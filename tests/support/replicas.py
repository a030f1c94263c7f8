"""Run control as N replica processes on one real PostgreSQL, behind a real gateway.

    mesh = QueueReplicas(root, tokens, database_url, replicas=3, config_yaml=CONFIG).start()
    mesh.gateway.address            # clients talk to the gateway; it spreads calls round-robin
    mesh.owners()                   # {replica index: number of sessions it owns now} (lease rows)
    mesh.kill(i)                    # SIGKILL replica i; mesh.pause(i) / mesh.resume(i): SIGSTOP / SIGCONT

Each replica is its own process (`queue_svc.main --database-url … --session-lease-seconds …`) with its
own data dir (audit log); the gateway gets the replicas as one address list (`ipv4:a,b,c`, balanced
per call). Used by tests/replicas and bench/scale_out.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from tests.support.gateway import ECHO_MODULE
from tests.support.mesh import ServiceProcess, Tokens, free_port


@dataclass
class QueueReplicas:
    root: Path
    tokens: Tokens
    database_url: str
    replicas: int = 3
    config_yaml: str = ""
    lease_seconds: float = 5.0
    queue: list[ServiceProcess] = field(default_factory=list)
    echo: ServiceProcess | None = None
    gateway: ServiceProcess | None = None
    dead: set[int] = field(default_factory=set)

    def start(self) -> QueueReplicas:
        cfg = self.root / "queue.yaml"
        self.root.mkdir(parents=True, exist_ok=True)
        cfg.write_text(self.config_yaml or "server: {}\n")
        ports = [free_port() for _ in range(self.replicas)]
        for i, port in enumerate(ports):
            proc = ServiceProcess(
                "queue",
                "queue_svc.main",
                self.root / f"queue{i}",
                self.tokens,
                port=port,
                extra=[
                    "--queue-config-file", str(cfg),
                    "--database-url", self.database_url,
                    "--session-lease-seconds", str(self.lease_seconds),
                    "--replica-id", f"replica-{i}",
                ],
            )  # fmt: skip
            self.queue.append(proc)
            proc.start(timeout=60)
        self.echo = ServiceProcess("voice", ECHO_MODULE, self.root / "echo", self.tokens).start()
        addresses = {
            "queue": ",".join(p.address for p in self.queue),
            "voice": self.echo.address,
            "nodes": self.echo.address,
            "config": f"127.0.0.1:{free_port()}",
            "reactions": f"127.0.0.1:{free_port()}",
        }
        self.gateway = ServiceProcess(
            "gateway", "gateway.main", self.root / "gateway", self.tokens, addresses=addresses
        ).start()
        return self

    def holder(self, i: int) -> str:
        return f"replica-{i}"

    def index_of(self, holder: str) -> int:
        return int(holder.removeprefix("replica-"))

    def leases(self) -> dict[str, tuple[str, float]]:
        """{session key: (holder, seconds to expiry)} from the lease rows (held ones only)."""
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT name, holder, EXTRACT(EPOCH FROM expires_at - now())::float8 FROM flynn_queue.leases "
                "WHERE scope = 'session' AND holder <> ''"
            ).fetchall()
        return {str(r[0]): (str(r[1]), float(r[2])) for r in rows}

    def owners(self) -> dict[int, int]:
        """{replica index: sessions it holds a live lease on}."""
        out: dict[int, int] = {}
        for holder, left in self.leases().values():
            if left > 0:
                out[self.index_of(holder)] = out.get(self.index_of(holder), 0) + 1
        return out

    def busiest(self) -> int:
        live = {i: n for i, n in self.owners().items() if i not in self.dead}
        return max(live, key=lambda i: live[i])

    def kill(self, i: int) -> None:
        self.queue[i].kill9()
        self.dead.add(i)

    def pause(self, i: int) -> None:
        proc = self.queue[i].proc
        assert proc is not None
        proc.send_signal(signal.SIGSTOP)

    def resume(self, i: int) -> None:
        proc = self.queue[i].proc
        assert proc is not None
        proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        for proc in (self.gateway, self.echo, *self.queue):
            if proc is not None:
                proc.stop()
