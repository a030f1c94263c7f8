"""Writes example_corpus.jsonl: a labelled event corpus for example_rules.yaml.

Labels say what an operator *wants* to happen for each event (the rules' intent), written from each
sample's intent flags below, never from the engine's output. Where a rule's scope is too coarse
(a keyword in a negated sentence, a help request without a keyword), the label and the engine
disagree on purpose: that is what the replay tool measures.

    python -m reactions_svc.corpus.build_corpus   # rewrites reactions_svc/corpus/example_corpus.jsonl
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("example_corpus.jsonl")

# (text, help intent, urgent intent)
MESSAGES: list[tuple[str, bool, bool]] = [
    # help requests that use a keyword
    ("help, my build is broken", True, False),
    ("Can you help me reset my password?", True, False),
    ("I need support with my invoice", True, False),
    ("how do I export my notes?", True, False),
    ("HELP!!! nothing works", True, False),
    ("could someone help with the calendar sync", True, False),
    ("How do I change the reply language?", True, False),
    ("need support: the app crashes on start", True, False),
    ("¿me ayudas? necesito help con esto", True, False),
    ("please help, login loops forever", True, False),
    ("support request: cannot attach files", True, False),
    ("help me understand this error message", True, False),
    ("how do i connect my phone as a node", True, False),
    ("I would like some help with the settings", True, False),
    # help requests without any keyword (the rule misses them)
    ("I'm stuck with the login page, can someone assist?", True, False),
    ("my export keeps failing, what should I do?", True, False),
    ("any idea why sync stopped?", True, False),
    ("nothing loads after the update, please advise", True, False),
    # keyword present but not a help request (the rule fires anyway)
    ("no help needed, thanks!", False, False),
    ("thanks for the help earlier", False, False),
    ("the help page looks great now", False, False),
    ("Is there support for markdown tables?", False, False),
    # neither
    ("good morning", False, False),
    ("what's the weather like in Lisbon", False, False),
    ("remind me to buy milk", False, False),
    ("summarise this article for me", False, False),
    ("lol", False, False),
    ("ok thanks", False, False),
    ("send me the weekly report", False, False),
    ("translate 'good night' to French", False, False),
    ("what time is it in Tokyo", False, False),
    ("write a haiku about autumn", False, False),
    ("helpful tips for writing emails?", False, False),
    ("the supporting documents are attached", False, False),
    ("👍", False, False),
    ("can you draft a reply to Sam", False, False),
    ("let's schedule the review for Friday", False, False),
    ("play some jazz", False, False),
    # urgent
    ("URGENT: prod is down", False, True),
    ("need this asap please", False, True),
    ("emergency - the server room is flooding", False, True),
    ("urgent: call me back", False, True),
    ("ASAP: the client is waiting on the contract", False, True),
    ("urgent help needed with the payment outage", True, True),
    # urgent without a keyword (missed)
    ("prod is down right now!!", False, True),
    ("everything is on fire, respond immediately", False, True),
    # the keyword without urgency (fires anyway)
    ("this is not urgent, whenever you can", False, False),
    ("no emergency, just curious about the roadmap", False, False),
]

CHANNELS = ["telegram", "slack", "cli", "telegram", "slack", "voice-demo"]
ACK_CHANNELS = {"telegram", "slack"}


def ev(event_id: str, type_: str, at: float, **fields: Any) -> dict[str, Any]:
    return {"event_id": event_id, "type": type_, **fields, "_at": at}


def main() -> None:
    rows: list[dict[str, Any]] = []
    t = 0.0
    n = 0

    def add(event: dict[str, Any], expected: list[str], note: str) -> None:
        at = event.pop("_at")
        rows.append({"at": at, "event": event, "expected": sorted(expected), "note": note})

    # 1. Every message on several channels, each in its own session.
    for rep, channel in enumerate(CHANNELS[:4]):
        for i, (text, helpy, urgent) in enumerate(MESSAGES):
            n += 1
            t += 1
            session = f"{channel}:u{rep}-{i}"
            if urgent:
                expected = ["urgent-page"]
            else:
                expected = (["ack-received"] if channel in ACK_CHANNELS else []) + (
                    ["help-desk"] if helpy else []
                )
            add(
                ev(
                    f"run:{n}",
                    "message_received",
                    t,
                    session_key=session,
                    channel=channel,
                    sender=f"user{i}",
                    text=text,
                    message_id=f"msg_{n}",
                ),
                expected,
                "urgent" if urgent else ("help request" if helpy else "chat"),
            )

    # 2. Cooldowns: a second help request in the same session within 10 minutes gets no second reply;
    #    a second urgent message within 2 minutes is not paged again (so the others run on it).
    for i in range(8):
        session = f"telegram:cool-{i}"
        for k, (text, dt) in enumerate(
            (("help, my build is broken", 0.0), ("still need help with it", 120.0))
        ):
            n += 1
            add(
                ev(
                    f"run:{n}",
                    "message_received",
                    t + 5000 + i * 1000 + dt,
                    session_key=session,
                    channel="telegram",
                    sender="dana",
                    text=text,
                    message_id=f"msg_{n}",
                ),
                ["ack-received", "help-desk"] if k == 0 else ["ack-received"],
                "help cooldown" if k else "help",
            )
        for k, (text, dt) in enumerate((("urgent: the site is down", 200.0), ("urgent: still down", 260.0))):
            n += 1
            add(
                ev(
                    f"run:{n}",
                    "message_received",
                    t + 5000 + i * 1000 + dt,
                    session_key=f"slack:ucool-{i}",
                    channel="slack",
                    sender="erin",
                    text=text,
                    message_id=f"msg_{n}",
                ),
                ["urgent-page"] if k == 0 else ["ack-received"],
                "urgent cooldown" if k else "urgent",
            )
    t += 20000

    # 3. Messages caused by reactions never trigger anything (default recursion guard).
    for i in range(12):
        n += 1
        t += 1
        add(
            ev(
                f"run:{n}",
                "message_received",
                t,
                session_key=f"telegram:r{i}",
                channel="telegram",
                sender="reaction:help-desk",
                text="Hi user, the help desk will get back to you shortly. urgent?",
                message_id=f"msg_{n}",
                causation={
                    "origin": "reaction",
                    "chain_id": f"run:{i + 1}",
                    "depth": 1,
                    "fired_rule_ids": ["help-desk"],
                },
            ),
            [],
            "reaction origin",
        )

    # 4. Run events.
    kinds = ["timeout", "agent", "restart", "cancel_deadline", "timeout", "agent"]
    for i in range(24):
        n += 1
        t += 100
        kind = kinds[i % len(kinds)]
        expected = ([] if kind == "restart" else ["run-error-apology"]) + (
            ["run-timeout-status"] if kind == "timeout" else []
        )
        add(
            ev(
                f"run:{n}",
                "run_error",
                t,
                session_key=f"cli:e{i}",
                channel="cli",
                run_id=f"run_{i}",
                error_kind=kind,
            ),
            expected,
            f"run error {kind}",
        )
        if i < 6 and kind != "restart":
            # A second error in the same session within a minute: no second apology.
            n += 1
            add(
                ev(
                    f"run:{n}",
                    "run_error",
                    t + 10,
                    session_key=f"cli:e{i}",
                    channel="cli",
                    run_id=f"run_b{i}",
                    error_kind="agent",
                ),
                [],
                "run error apology cooldown",
            )
    for i in range(4):  # a run started by a reaction's message fails: no reaction to it
        n += 1
        t += 100
        add(
            ev(
                f"run:{n}",
                "run_error",
                t,
                session_key=f"cli:re{i}",
                channel="cli",
                run_id=f"run_r{i}",
                error_kind="timeout",
                causation={
                    "origin": "reaction",
                    "chain_id": "run:7",
                    "depth": 1,
                    "fired_rule_ids": ["help-desk"],
                },
            ),
            [],
            "reaction-caused run error",
        )
    for i, length in enumerate([10, 500, 1999, 2000, 2001, 5000, 12000, 80]):
        n += 1
        t += 1
        add(
            ev(
                f"run:{n}",
                "run_completed",
                t,
                session_key=f"cli:c{i}",
                channel="cli",
                run_id=f"run_c{i}",
                text="x" * length,
            ),
            ["long-answer-canvas"] if length > 2000 else [],
            f"answer of {length} characters",
        )
    for i, channel in enumerate(["telegram", "slack", "telegram", "cli", "telegram", "voice-demo"]):
        n += 1
        t += 1
        add(
            ev(
                f"run:{n}",
                "run_cancelled",
                t,
                session_key=f"{channel}:x{i}",
                channel=channel,
                run_id=f"run_x{i}",
                attributes={"reason": "user"},
            ),
            ["cancel-ack"] if channel == "telegram" else [],
            "run cancelled",
        )
    for i in range(6):
        n += 1
        t += 1
        add(
            ev(f"run:{n}", "run_started", t, session_key=f"cli:s{i}", channel="cli", run_id=f"run_s{i}"),
            [],
            "run started",
        )

    # 5. Node and canvas events.
    m = 0
    for i, role in enumerate(["desktop", "phone", "desktop", "desktop", "phone", "kiosk"]):
        m += 1
        t += 1
        add(
            ev(
                f"node:{m}",
                "node_connected",
                t,
                node_id=f"node-{i}",
                node_role=role,
                attributes={"reconnected": "true" if i % 2 else "false"},
            ),
            ["desktop-welcome"] if role == "desktop" else [],
            f"{role} connected",
        )
    for i, reason in enumerate(
        ["lease_expired", "stream_closed", "lease_expired", "shutdown", "token_revoked", "lease_expired"]
    ):
        m += 1
        t += 1
        add(
            ev(
                f"node:{m}",
                "node_disconnected",
                t,
                node_id=f"node-{i}",
                node_role="desktop",
                attributes={"reason": reason},
            ),
            ["node-lost-alert"] if reason == "lease_expired" else [],
            f"disconnect {reason}",
        )
    for i in range(4):
        m += 1
        t += 1
        add(ev(f"node:{m}", "canvas_changed", t, artifact_name=f"welcome/node-{i}"), [], "canvas changed")
    for i, channel in enumerate(["voice-demo", "voice-demo", "telegram", "voice-demo"]):
        n += 1
        t += 1
        add(
            ev(
                f"tts:{i}",
                "tts_fallback",
                t,
                session_key=f"{channel}:v{i}",
                channel=channel,
                attributes={"reason": "timeout"},
            ),
            ["tts-fallback-note"] if channel == "voice-demo" else [],
            "tts fallback",
        )

    rows.sort(key=lambda r: r["at"])
    with OUT.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} events to {OUT}")


if __name__ == "__main__":
    main()
