"""PostgreSQL crashes while a real reactions process consumes run events, then comes back: the
process goes NOT_SERVING and back to SERVING by itself, and afterwards every event was acted on
exactly once (no event missed across the outage, no action done twice)."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flynn_launcher.local_postgres import LocalPostgres
from tests.support.mesh import ServiceProcess, Tokens
from tests.support.reactions import ACK_AND_ECHO_RULES as RULES
from tests.support.reactions import RunControlServer, replies_once_per_message, wait_rule_matches


def wait_health(address: str, want: int, within: float) -> float:
    start = time.monotonic()
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() - start < within:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == want:
                    return time.monotonic() - start
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise AssertionError(f"{address} not {want} within {within} s")


def test_postgres_crash_mid_stream(
    tmp_path: Path, tokens: Tokens, postgres: LocalPostgres, postgres_url: str
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    first_batch, second_batch = 200, 100
    total = first_batch + second_batch
    with RunControlServer() as rc:
        svc = rc.servicer
        proc = ServiceProcess(
            "reactions",
            "reactions_svc.main",
            tmp_path / "data",
            tokens,
            addresses={"queue": rc.address, "config": "127.0.0.1:1", "nodes": "127.0.0.1:1"},
            extra=["--rules-file", str(rules), "--consume", "run", "--database-url", postgres_url],
        )
        try:
            proc.start()
            for i in range(first_batch):
                svc.message(f"s{i % 7}", f"message {i}")
            assert svc.wait_for(lambda: len(svc.rec.replies) >= 80, timeout=60), proc.log_tail()
            postgres.kill()
            print(
                f"NOT_SERVING after {wait_health(proc.address, health_pb2.HealthCheckResponse.NOT_SERVING, 6):.2f} s"
            )
            for i in range(first_batch, total):
                svc.message(f"s{i % 7}", f"message {i}")
            time.sleep(1.0)
            postgres.start()
            print(
                f"SERVING after {wait_health(proc.address, health_pb2.HealthCheckResponse.SERVING, 20):.2f} s"
            )
            assert svc.wait_for(lambda: len(svc.rec.replies) >= 2 * total, timeout=120), proc.log_tail()

            replies_once_per_message(svc, total)
            # Every event evaluated and counted exactly once.
            wait_rule_matches(proc.address, tokens.md("operator"), {"ack-all": total, "echo": total})
            assert proc.terminate() == 0
        finally:
            proc.stop()
