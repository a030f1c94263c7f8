"""Test support for the integrated flow: the whole mesh as real processes, reached only through the gateway.

Every service runs as its own process on ports chosen up front (gRPC and metrics both fixed, so a
service killed and restarted comes back where the gateway and its peers expect it), the config
service seeded from a YAML written by the test, and the gateway told every metrics address
(--metrics-addrs) so System.GetMetrics works. `flynn(...)` runs the operator CLI as a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import grpc
import yaml
from flynn.v1 import (
    config_pb2,
    config_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    run_control_pb2,
    system_pb2,
    system_pb2_grpc,
)
from google.protobuf import field_mask_pb2

from flynn_runtime import config_yaml, topology
from tests.support.mesh import ROOT, ServiceProcess, Tokens, free_port

T = TypeVar("T")

# `flynn gates check` exit codes that mean "no gate failed": 0 passed, 3 inconclusive (a gate had less
# than its minimum sample, which a small test mesh often has).
NO_GATE_FAILED = (0, 3)


def assert_gates_hold_after_kills(out: str) -> dict[str, dict[str, str]]:
    """`flynn gates check --json` output after services were killed on purpose: every gate holds
    except error_rate, which may fail, and then only for the kills (runs failed by the restart
    policy, the gateway's UNAVAILABLE while a service was down). Returns the gates by name."""
    gates: dict[str, dict[str, str]] = {g["gate"]: g for g in json.loads(out)["gates"]}
    assert [g for name, g in gates.items() if g["result"] == "fail" and name != "error_rate"] == [], out
    rate = gates["error_rate"]
    assert rate["result"] in ("fail", "pass", "inconclusive"), rate
    if rate["result"] == "fail":
        assert "server_error/UNAVAILABLE" in rate["note"] or "in error" in rate["note"], rate
    return gates


# A seed for flow tests: fast default agent, speech for one channel, voice notes through pocketsphinx
# (fast on these machines), an ack reaction on every message.
FLOW_SEED: dict[str, Any] = {
    "server": {
        "queue": {
            "mode": "collect",
            "cap": 50,
            "drop": "old",
            "quiet_window": "50ms",
            "cancel_deadline": "2s",
            "restart_policy": "fail",
        },
        "agent": {"think_time": "20ms", "chunks": 2, "chunk_interval": "5ms", "run_timeout": "60s"},
        "nodes": {
            "enabled": True,
            "allowed_roles": ["desktop", "phone"],
            "heartbeat_interval": "1s",
            "lease": "5s",
            "feature_gates.ui.canvas": True,
        },
    },
    "tts": {"enabled": True, "enabled_channels": ["voice-demo"], "engines": ["espeak-ng"], "deadline": "10s"},
    "audio": {"enabled": True, "engines": ["pocketsphinx"], "deadline": "30s"},
    "automation": {
        "reactions": [
            {
                "id": "ack-received",
                "enabled": True,
                "trigger": {"event": "message_received"},
                "priority": 10,
                "actions": [{"ack": {"emoji": "👀"}}],
            }
        ]
    },
}


def poll(fn: Callable[[], T | None], timeout: float = 20.0, interval: float = 0.05, what: str = "") -> T:
    """Call fn until it returns something truthy (bounded)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except grpc.RpcError as e:
            last = e
        else:
            if last:
                return last  # type: ignore[no-any-return]
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what or fn}: last {last!r}")


@dataclass
class FlowMesh:
    root: Path
    tokens: Tokens
    seed: dict[str, Any] = field(default_factory=lambda: FLOW_SEED)
    voice_extra: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # added to every service's environment (OTEL_*)
    procs: dict[str, ServiceProcess] = field(default_factory=dict)
    metrics_ports: dict[str, int] = field(default_factory=dict)
    _channel: grpc.Channel | None = None

    def start(self) -> FlowMesh:
        seed_path = self.root / "seed.yaml"
        self.root.mkdir(parents=True, exist_ok=True)
        seed_path.write_text(yaml.safe_dump(self.seed, allow_unicode=True))
        ports = {name: free_port() for name in topology.START_ORDER}
        self.metrics_ports = {name: free_port() for name in topology.START_ORDER}
        addresses = {n: f"127.0.0.1:{p}" for n, p in ports.items() if n != "gateway"}
        scrape = ",".join(f"{n}=127.0.0.1:{self.metrics_ports[n]}" for n in addresses)
        for name in topology.START_ORDER:
            extra = ["--metrics-listen", f"127.0.0.1:{self.metrics_ports[name]}"]
            if name == "config":
                extra += ["--seed-file", str(seed_path)]
            if name == "voice":
                extra += self.voice_extra
            if name == "gateway":
                extra += ["--metrics-addrs", scrape]
            proc = ServiceProcess(
                name,
                topology.SERVICES[name].module,
                self.root / name,
                self.tokens,
                addresses=addresses,
                extra=extra,
                port=ports[name],
                grace=5.0,
                env=dict(self.env),
            )
            self.procs[name] = proc
            proc.start(timeout=90)
        self.wait_watchers_applied(self.head_revision(), timeout=30)
        return self

    def stop(self) -> None:
        if self._channel is not None:
            self._channel.close()
        for name in reversed(list(self.procs)):
            self.procs[name].stop()

    # --- processes ---------------------------------------------------------------------------------

    @property
    def gateway(self) -> str:
        return self.procs["gateway"].address

    def kill9(self, name: str) -> None:
        self.procs[name].kill9()

    def restart(self, name: str, extra: list[str] | None = None) -> None:
        proc = self.procs[name]
        proc.stop()
        if extra is not None:
            proc.extra = ["--metrics-listen", f"127.0.0.1:{self.metrics_ports[name]}", *extra]
        proc.start(timeout=90)

    def start_again(self, name: str) -> None:
        """Start a process that was killed (same ports, same data dir)."""
        self.procs[name].start(timeout=90)

    def all_serving(self) -> dict[str, str]:
        resp = self.system().GetStatus(
            system_pb2.GetStatusRequest(), metadata=self.md("operator"), timeout=10
        )
        return {s.service: system_pb2.ServiceHealth.Name(s.health) for s in resp.services}

    # --- clients -----------------------------------------------------------------------------------

    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = grpc.insecure_channel(
                self.gateway,
                options=[
                    ("grpc.max_receive_message_length", 64 << 20),
                    ("grpc.max_send_message_length", 64 << 20),
                ],
            )
        return self._channel

    def md(self, role: str = "channel") -> tuple[tuple[str, str], ...]:
        return self.tokens.md(role)

    def gw(self) -> gateway_pb2_grpc.GatewayStub:
        return gateway_pb2_grpc.GatewayStub(self.channel())

    def system(self) -> system_pb2_grpc.SystemStub:
        return system_pb2_grpc.SystemStub(self.channel())

    def config(self) -> config_pb2_grpc.ConfigServiceStub:
        return config_pb2_grpc.ConfigServiceStub(self.channel())

    def send(
        self, session: str, text: str, key: str, channel: str = "cli", **kw: Any
    ) -> gateway_pb2.SendMessageResponse:
        req = gateway_pb2.SendMessageRequest(
            channel=channel, session_key=session, sender="tester", text=text, idempotency_key=key, **kw
        )
        resp: gateway_pb2.SendMessageResponse = self.gw().SendMessage(req, metadata=self.md(), timeout=30)
        return resp

    def wait_replies(
        self,
        pred: Callable[[list[run_control_pb2.Reply]], bool],
        after: int = 0,
        timeout: float = 30.0,
        channels: tuple[str, ...] = (),
    ) -> list[run_control_pb2.Reply]:
        """Read the reply stream until pred(all replies so far) holds (bounded)."""
        out: list[run_control_pb2.Reply] = []
        call = self.gw().StreamReplies(
            gateway_pb2.GatewayStreamRepliesRequest(after_cursor=after, channels=list(channels)),
            metadata=self.md(),
            timeout=timeout,
        )
        try:
            for msg in call:
                out.append(msg.reply)
                if pred(out):
                    call.cancel()  # type: ignore[no-untyped-call]
                    return out
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.CANCELLED and pred(out):
                return out
            raise AssertionError(f"reply stream ended before the condition held ({e}); got {len(out)}") from e
        raise AssertionError(f"reply stream ended before the condition held; got {len(out)}")

    def metrics(self) -> system_pb2.GetMetricsResponse:
        resp: system_pb2.GetMetricsResponse = self.system().GetMetrics(
            system_pb2.GetMetricsRequest(), metadata=self.md("operator"), timeout=10
        )
        return resp

    # --- config ------------------------------------------------------------------------------------

    def head_revision(self) -> int:
        return int(
            self.config()
            .GetConfig(config_pb2.GetConfigRequest(), metadata=self.md("operator"), timeout=10)
            .revision
        )

    def update(self, values: dict[str, Any], reason: str = "flow test") -> int:
        """UpdateConfig of the given dotted keys (YAML-ish values) through the gateway; returns the revision."""
        cfg = config_yaml.dict_to_config(values)
        stub = self.config()
        head = self.head_revision()
        resp = stub.UpdateConfig(
            config_pb2.UpdateConfigRequest(
                config=cfg,
                update_mask=field_mask_pb2.FieldMask(paths=list(values)),
                expected_revision=head,
                reason=reason,
            ),
            metadata=self.md("operator"),
            timeout=10,
        )
        self.wait_watchers_applied(resp.revision)
        return int(resp.revision)

    def watchers(self) -> list[config_pb2.WatcherStatus]:
        resp = self.config().ListWatchers(
            config_pb2.ListWatchersRequest(page_size=1000), metadata=self.md("operator"), timeout=10
        )
        return list(resp.watchers)

    #: The services that watch config in this mesh.
    watching: ClassVar[frozenset[str]] = frozenset({"queue", "reactions", "nodes", "voice", "gateway"})

    def wait_watchers_applied(self, revision: int, timeout: float = 15.0) -> None:
        """Every service that watches config (the best of its connected instances) reports `revision`."""
        services = self.watching

        def ok() -> bool:
            best: dict[str, int] = {}
            for w in self.watchers():
                if w.connected:
                    best[w.identity.service] = max(best.get(w.identity.service, 0), w.applied_revision)
            return all(best.get(s, 0) >= revision for s in services)

        poll(ok, timeout=timeout, what=f"every watcher at revision {revision}")

    # --- CLI ---------------------------------------------------------------------------------------

    def flynn(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        env = dict(
            os.environ,
            FLYNN_ADDR=self.gateway,
            FLYNN_TOKEN=self.tokens.operator,
            PYTHONPATH=f"{ROOT}:{ROOT / 'gen'}",
        )
        return subprocess.run(
            [sys.executable, "-m", "flynn_cli.main", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=ROOT,
        )


def flow_mesh(root: Path, tokens: Tokens, **kw: Any) -> Iterator[FlowMesh]:
    mesh = FlowMesh(root, tokens, **kw)
    try:
        mesh.start()
        yield mesh
    finally:
        mesh.stop()


def final_for(run_id: str) -> Callable[[list[run_control_pb2.Reply]], bool]:
    """A wait_replies predicate: the replies hold the final of run `run_id`."""
    return lambda rs: any(r.kind == run_control_pb2.REPLY_KIND_FINAL and r.run_id == run_id for r in rs)
