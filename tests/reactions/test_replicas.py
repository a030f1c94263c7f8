"""Two reactions replicas (real processes) on one real PostgreSQL, consuming the run events of a real
RunControl server (the recording server of tests/support/reactions.py): partitions are divided between
them; one is SIGKILLed mid-stream; the survivor takes its partitions over after the lease expires.
Every event is evaluated once and every action done once."""

from __future__ import annotations

import contextlib
import signal
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
from flynn.v1 import reactions_pb2, reactions_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.support.mesh import ServiceProcess, Tokens
from tests.support.reactions import (
    ACK_AND_ECHO_RULES as RULES,
)
from tests.support.reactions import (
    RunControlServer,
    echoed_once_across_a_kill,
    wait_rule_matches,
)


def _events_handled(proc: ServiceProcess) -> float:
    """reactions_events_total{source="run_events"} from the process's /metrics."""
    port = int((proc.data_dir / ".reactions.port").read_text().split()[1])
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if sample.name == "reactions_events_total" and sample.labels.get("source") == "run_events":
                return float(sample.value)
    return 0.0


@contextlib.contextmanager
def _two_replicas(
    tmp_path: Path, tokens: Tokens, postgres_url: str, rules_yaml: str
) -> Iterator[tuple[RunControlServer, ServiceProcess, ServiceProcess]]:
    """A fake run control and two reactions replicas (a, b) consuming its run events with the rules
    `rules_yaml`, on one PostgreSQL. The replicas are not started; they are stopped (resumed first,
    if the test paused one) when the block ends."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(rules_yaml)
    with RunControlServer() as rc:
        a, b = (
            ServiceProcess(
                "reactions",
                "reactions_svc.main",
                tmp_path / f"reactions-{name}",
                tokens,
                addresses={"queue": rc.address, "config": "127.0.0.1:1", "nodes": "127.0.0.1:1"},
                extra=["--rules-file", str(rules), "--consume", "run", "--database-url", postgres_url],
            )
            for name in ("a", "b")
        )
        try:
            yield rc, a, b
        finally:
            for p in (a, b):
                if p.proc is not None and p.proc.poll() is None:
                    p.proc.send_signal(signal.SIGCONT)
                p.stop()


def _start_divided(a: ServiceProcess, b: ServiceProcess) -> None:
    """Start both; return once b has joined (a released partitions to it)."""
    a.start()
    b.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and "partitions changed" not in b.log_tail(200):
        time.sleep(0.1)


def test_two_replicas_one_sigkilled_every_action_exactly_once(
    tmp_path: Path, tokens: Tokens, postgres_url: str
) -> None:
    sessions = 16
    first_batch, second_batch = 300, 100
    with _two_replicas(tmp_path, tokens, postgres_url, RULES) as (rc, a, b):
        svc = rc.servicer
        # Both replicas hold partitions before the load starts (b joined: a released half).
        _start_divided(a, b)
        time.sleep(4)  # a releases its extras on its next round, b acquires them on its next
        for i in range(first_batch):
            svc.message(f"s{i % sessions}", f"message {i}")
        assert svc.wait_for(lambda: len(svc.rec.replies) >= 200, timeout=60), a.log_tail() + b.log_tail()
        handled_a, handled_b = _events_handled(a), _events_handled(b)
        a.kill9()
        with svc.cond:
            at_kill = len(svc.rec.replies)
        assert at_kill < 2 * first_batch, "killed too late to be mid-stream"
        for i in range(first_batch, first_batch + second_batch):
            svc.message(f"s{i % sessions}", f"message {i}")
        total = first_batch + second_batch
        # b takes a's partitions over once a's leases expire (5 s) and finishes the stream.
        assert svc.wait_for(lambda: len(svc.rec.replies) >= 2 * total, timeout=90), b.log_tail()
        time.sleep(1.0)  # nothing more may arrive
        print(f"replies at kill {at_kill}")
        echoed_once_across_a_kill(svc, total)
        # Evaluated once each: the counters (one per evaluation) equal the number of events.
        wait_rule_matches(b.address, tokens.md("operator"), {"ack-all": total, "echo": total})
        # Both replicas did part of the work before the kill: the stream really was divided.
        print(f"events handled before the kill: a {handled_a}, b {handled_b}")
        assert handled_a > 0 and handled_b > 0
        assert b.terminate() == 0


def test_a_paused_replica_loses_its_partitions_and_acts_on_nothing_twice(
    tmp_path: Path, tokens: Tokens, postgres_url: str
) -> None:
    """SIGSTOP one replica longer than the partition lease, then SIGCONT: the other took its
    partitions (epoch + 1); the paused one's late work is fenced or deduplicated."""
    sessions = 16
    with _two_replicas(tmp_path, tokens, postgres_url, RULES) as (rc, a, b):
        svc = rc.servicer
        a.start()
        b.start()
        time.sleep(5)  # partitions divided between a and b
        for i in range(100):
            svc.message(f"s{i % sessions}", f"message {i}")
        assert svc.wait_for(lambda: len(svc.rec.replies) >= 60, timeout=60), a.log_tail() + b.log_tail()
        assert a.proc is not None
        a.proc.send_signal(signal.SIGSTOP)
        for i in range(100, 200):
            svc.message(f"s{i % sessions}", f"message {i}")
        # b takes a's partitions once their lease (5 s) expires and handles everything.
        assert svc.wait_for(lambda: len(svc.rec.replies) >= 400, timeout=60), b.log_tail()
        a.proc.send_signal(signal.SIGCONT)
        for i in range(200, 250):
            svc.message(f"s{i % sessions}", f"message {i}")
        total = 250
        assert svc.wait_for(lambda: len(svc.rec.replies) >= 2 * total, timeout=60), (
            a.log_tail() + b.log_tail()
        )
        time.sleep(2.0)  # a's late attempts, if any, have had their chance
        with svc.cond:
            replies = list(svc.rec.replies.values())
        per = Counter((r.kind, r.reply_to_message_id or r.text) for r in replies)
        assert len(replies) == 2 * total and all(n == 1 for n in per.values())
        with grpc.insecure_channel(b.address) as ch:
            stats = reactions_pb2_grpc.ReactionsStub(ch).GetRuleStats(
                reactions_pb2.GetRuleStatsRequest(), metadata=tokens.md("operator"), timeout=10
            )
        assert {s.rule_id: s.matches for s in stats.rules} == {"ack-all": total, "echo": total}
        # a noticed it lost partitions while it was stopped (renewal or a fenced cursor write).
        log = a.log_tail(2000)
        assert '"removed": [' in log and "partitions changed" in log, log[-2000:]


SHARED_RULES = """
automation:
  reactions:
    - id: once-globally
      enabled: true
      trigger: {event: message_received}
      cooldown: 1h
      cooldown_key: global
      actions:
        - reply: {text: "global fire"}
    - id: once-per-channel
      enabled: true
      trigger: {event: message_received}
      cooldown: 1h
      cooldown_key: channel
      actions:
        - reply: {text: "channel fire"}
"""


def test_cooldowns_shared_by_sessions_hold_across_replicas(
    tmp_path: Path, tokens: Tokens, postgres_url: str
) -> None:
    """Rules whose cooldown key spans sessions (global, channel) fire once per window in total, not
    once per replica: events of different sessions are evaluated on different replicas, and a fire of
    a shared key is claimed in the database (the replica that loses evaluates again and skips)."""
    sessions, channels = 16, ("cli", "tg")
    with _two_replicas(tmp_path, tokens, postgres_url, SHARED_RULES) as (rc, a, b):
        svc = rc.servicer
        _start_divided(a, b)
        time.sleep(4)  # partitions divided between a and b
        total = 96
        for i in range(total):
            svc.message(f"s{i % sessions}", f"message {i}", channel=channels[i % 2])
        assert svc.wait_for(lambda: _events_handled(a) + _events_handled(b) >= total, timeout=60), (
            a.log_tail() + b.log_tail()
        )
        handled_a, handled_b = _events_handled(a), _events_handled(b)
        assert handled_a > 0 and handled_b > 0, (handled_a, handled_b)  # both replicas evaluated
        time.sleep(1.0)  # any second fire would have arrived by now
        with svc.cond:
            texts = Counter(r.text for r in svc.rec.replies.values())
        assert texts == {"global fire": 1, "channel fire": len(channels)}, texts
        with grpc.insecure_channel(b.address) as ch:
            stats = reactions_pb2_grpc.ReactionsStub(ch).GetRuleStats(
                reactions_pb2.GetRuleStatsRequest(), metadata=tokens.md("operator"), timeout=10
            )
        matches = {s.rule_id: s.matches for s in stats.rules}
        assert matches == {"once-globally": 1, "once-per-channel": len(channels)}, matches
