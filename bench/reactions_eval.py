"""Reaction rule evaluation: latency of one event against 10, 100 and 1,000 rules, and events/s.

    .venv/bin/python -m bench.reactions_eval [--events 5000] [--pipeline-events 300]

Engine figures are the pure evaluation (reactions_svc.engine.evaluate: priority order, scope,
keywords, RE2 regexes, conditions, recursion guard, rollout, cooldown, fire windows) of one event,
single thread, as the service does it before persisting. Rule sets:

  mixed       rules spread over the event types like a real config: about 60% on message_received,
              of those 50% with keywords, 40% with a regex, 9% channel-scoped only, 1% catch-all;
              conditions, cooldowns, fire caps and rollouts on some; 80% of the events are chat messages
              of 60-200 characters (the rest other event types)
  worst       every rule listens to message_received with keywords and a regex and a condition
  1 MB text   the mixed set, one event whose text is 1 MB (bounded to 64 KiB evaluated)

Pipeline figures are Reactor.handle end to end on a real SQLite store (WAL, synchronous=FULL:
one fsync'd transaction for the decision and one for the outcome) with a no-op action runner:
what the service sustains per consumer, excluding the downstream calls.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path

from flynn.v1 import common_pb2, config_pb2, reactions_pb2
from google.protobuf import duration_pb2

from reactions_svc import engine
from reactions_svc.reactor import ActionContext, ActionOutcome, Reactor
from reactions_svc.rules import RuleSet
from reactions_svc.store_sqlite import SqliteReactionStore

VOCAB = (
    "help deploy build broken login password invoice export notes sync calendar node canvas voice reply "
    "urgent later today tomorrow meeting report weekly summary article translate weather lisbon tokyo "
    "jazz review friday draft sam crash update settings language phone desktop error timeout agent "
    "please thanks hello morning night coffee budget plan roadmap ticket queue server database cache"
).split()
# Rule vocabulary: rules look for specific terms (product names, error codes, intents) that a message
# contains only now and then, so an event fires a handful of rules, not hundreds.
RARE = [f"term{i}" for i in range(3000)]
TYPES = [t for t in config_pb2.ReactionEventType.values() if t != 0]
MSG = config_pb2.REACTION_EVENT_TYPE_MESSAGE_RECEIVED
CHANNELS = ["telegram", "slack", "cli", "voice-demo"]


def _action() -> config_pb2.ReactionAction:
    return config_pb2.ReactionAction(reply=config_pb2.ReplyAction(text="seen {text}"))


def mixed_rules(n: int, rnd: random.Random) -> list[config_pb2.ReactionRule]:
    rules = []
    for i in range(n):
        r = config_pb2.ReactionRule(
            id=f"rule-{i:04d}", enabled=rnd.random() > 0.05, priority=rnd.randint(0, 50)
        )
        r.actions.append(_action())
        r.trigger.event = MSG if rnd.random() < 0.6 else rnd.choice(TYPES)
        if r.trigger.event == MSG:
            x = rnd.random()
            if x < 0.5:
                r.trigger.keywords.extend(rnd.sample(RARE, rnd.randint(1, 3)))
            elif x < 0.9:
                r.trigger.regex = rf"(?i)\b{rnd.choice(RARE)}\b.*\b{rnd.choice(VOCAB)}\b"
            elif x < 0.99:
                r.trigger.channels.append(rnd.choice(CHANNELS))
            # the rest (1%) listen to every message, like an "ack everything" rule
            if rnd.random() < 0.2 and not r.trigger.channels:
                r.trigger.channels.append(rnd.choice(CHANNELS))
        if rnd.random() < 0.15:
            r.conditions.add(
                field="text_length", operator=config_pb2.CONDITION_OPERATOR_GREATER_THAN, value="80"
            )
        if rnd.random() < 0.3:
            r.cooldown.CopyFrom(duration_pb2.Duration(seconds=60))
        if rnd.random() < 0.2:
            r.fire_cap.max_fires = 5
            r.fire_cap.window.CopyFrom(duration_pb2.Duration(seconds=600))
        if rnd.random() < 0.05:
            r.rollout.basis_points = 2500
        rules.append(r)
    return rules


def worst_rules(n: int, rnd: random.Random) -> list[config_pb2.ReactionRule]:
    rules = []
    for i in range(n):
        a, b = rnd.sample(VOCAB, 2)
        r = config_pb2.ReactionRule(id=f"w-{i:04d}", enabled=True, priority=rnd.randint(0, 50))
        r.trigger.event = MSG
        r.trigger.keywords.extend(rnd.sample(VOCAB, 3))
        r.trigger.regex = rf"(?i)\b{a}\b.*\b{b}\b"  # common words: most rules pass the keyword test
        r.conditions.add(field="sender", operator=config_pb2.CONDITION_OPERATOR_NOT_EQUALS, value="bot")
        r.cooldown.CopyFrom(duration_pb2.Duration(seconds=30))
        r.actions.append(_action())
        rules.append(r)
    return rules


def events(
    count: int, rnd: random.Random, text_len: tuple[int, int] = (60, 200)
) -> list[reactions_pb2.ReactionEvent]:
    out = []
    for i in range(count):
        words: list[str] = []
        target = rnd.randint(*text_len)
        while sum(len(w) + 1 for w in words) < target:
            words.append(rnd.choice(VOCAB) if rnd.random() > 0.15 else rnd.choice(RARE[:600]))
        t = MSG if rnd.random() < 0.8 else rnd.choice(TYPES)
        out.append(
            reactions_pb2.ReactionEvent(
                event_id=f"run:{i}",
                type=t,
                session_key=f"s{rnd.randint(0, 500)}",
                channel=rnd.choice(CHANNELS),
                sender=f"u{rnd.randint(0, 100)}",
                text=" ".join(words),
                message_id=f"m{i}",
                error_kind="timeout",
                causation=common_pb2.Causation(origin=common_pb2.ORIGIN_USER),
            )
        )
    return out


def pct(sorted_us: list[float], p: float) -> float:
    return sorted_us[min(len(sorted_us) - 1, int(round(p / 100 * (len(sorted_us) - 1))))]


def measure(
    rules: list[config_pb2.ReactionRule], evs: list[reactions_pb2.ReactionEvent]
) -> tuple[list[float], float, int]:
    rs = RuleSet(rules, 1)
    state = engine.FireState()
    for ev in evs[:200]:  # warm up (lazy per-type tables, RE2 DFA states)
        engine.evaluate(ev, rs, state, 0.0, dry_run=True)
    lat = []
    matched = 0
    start = time.perf_counter()
    now = 1000.0
    for ev in evs:
        t0 = time.perf_counter()
        r = engine.evaluate(ev, rs, state, now)
        lat.append((time.perf_counter() - t0) * 1e6)
        matched += len(r.matched)
        now += 0.05
    wall = time.perf_counter() - start
    lat.sort()
    return lat, len(evs) / wall, matched


class NoopRunner:
    async def run(self, kind: str, action: config_pb2.ReactionAction, ctx: ActionContext) -> ActionOutcome:
        return ActionOutcome(True, result_id="noop")


async def pipeline(
    rules: list[config_pb2.ReactionRule], evs: list[reactions_pb2.ReactionEvent]
) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory() as d:
        rs = RuleSet(rules, 1)
        store = SqliteReactionStore(Path(d) / "reactions")
        reactor = Reactor(store, lambda: rs, NoopRunner())
        lat = []
        start = time.perf_counter()
        for ev in evs:
            t0 = time.perf_counter()
            await reactor.process(ev)
            lat.append((time.perf_counter() - t0) * 1e3)
        wall = time.perf_counter() - start
        await store.close()
    lat.sort()
    return len(evs) / wall, statistics.median(lat), pct(lat, 99)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--events", type=int, default=5000)
    p.add_argument("--pipeline-events", type=int, default=300)
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args()
    rnd = random.Random(args.seed)
    evs = events(args.events, rnd)
    print(f"engine: one event against N rules, {args.events} events per row, single thread")
    print(
        f"{'rule set':<10} {'rules':>6} {'p50 us':>8} {'p95 us':>8} {'p99 us':>8} {'max us':>8} {'events/s':>10} {'fires/event':>12}"
    )
    for kind, make in (("mixed", mixed_rules), ("worst", worst_rules)):
        for n in (10, 100, 1000):
            lat, rate, matched = measure(make(n, random.Random(n)), evs)
            print(
                f"{kind:<10} {n:>6} {pct(lat, 50):>8.1f} {pct(lat, 95):>8.1f} {pct(lat, 99):>8.1f} {lat[-1]:>8.1f} "
                f"{rate:>10.0f} {matched / len(evs):>12.2f}"
            )
    big_rules = RuleSet(mixed_rules(1000, random.Random(1000)), 1)
    big = reactions_pb2.ReactionEvent(
        event_id="big",
        type=MSG,
        text=" ".join(rnd.choice(VOCAB) for _ in range(180_000))[: 1 << 20],
        session_key="s",
    )
    big_lat = []
    for i in range(20):
        big.event_id = f"big{i}"
        t0 = time.perf_counter()
        engine.evaluate(big, big_rules, engine.FireState(), 0.0)
        big_lat.append((time.perf_counter() - t0) * 1e3)
    big_lat.sort()
    print(
        f"1 MB text, 1000 mixed rules: p50 {statistics.median(big_lat):.2f} ms, max {big_lat[-1]:.2f} ms (64 KiB evaluated)"
    )
    print(
        f"\npipeline: Reactor.handle on SQLite (fsync), no-op actions, {args.pipeline_events} events per row"
    )
    print(f"{'rules':>6} {'events/s':>10} {'p50 ms':>8} {'p99 ms':>8}")
    for n in (10, 100, 1000):
        rate, p50, p99 = asyncio.run(pipeline(mixed_rules(n, random.Random(n)), evs[: args.pipeline_events]))
        print(f"{n:>6} {rate:>10.0f} {p50:>8.2f} {p99:>8.2f}")


if __name__ == "__main__":
    main()
