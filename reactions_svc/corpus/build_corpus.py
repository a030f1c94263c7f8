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


class _Corpus:
    """The rows being built, with the running clock `t` and the event counters `n` (runs) and `m` (nodes)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.t = 0.0
        self.n = 0
        self.m = 0

    def add(self, event: dict[str, Any], expected: list[str], note: str) -> None:
        at = event.pop("_at")
        self.rows.append({"at": at, "event": event, "expected": sorted(expected), "note": note})

    def messages(self) -> None:
        """1. Every message on several channels, each in its own session."""
        for rep, channel in enumerate(CHANNELS[:4]):
            for i, (text, helpy, urgent) in enumerate(MESSAGES):
                self.n += 1
                self.t += 1
                n, session = self.n, f"{channel}:u{rep}-{i}"
                if urgent:
                    expected = ["urgent-page"]
                else:
                    expected = (["ack-received"] if channel in ACK_CHANNELS else []) + (
                        ["help-desk"] if helpy else []
                    )
                self.add(
                    ev(
                        f"run:{n}",
                        "message_received",
                        self.t,
                        session_key=session,
                        channel=channel,
                        sender=f"user{i}",
                        text=text,
                        message_id=f"msg_{n}",
                    ),
                    expected,
                    "urgent" if urgent else ("help request" if helpy else "chat"),
                )

    def _message(
        self, at: float, session: str, channel: str, sender: str, text: str, expected: list[str], note: str
    ) -> None:
        self.n += 1
        n = self.n
        self.add(
            ev(
                f"run:{n}",
                "message_received",
                at,
                session_key=session,
                channel=channel,
                sender=sender,
                text=text,
                message_id=f"msg_{n}",
            ),
            expected,
            note,
        )

    def cooldowns(self) -> None:
        """2. Cooldowns: a second help request in the same session within 10 minutes gets no second
        reply; a second urgent message within 2 minutes is not paged again (so the others run on it)."""
        t = self.t
        for i in range(8):
            session = f"telegram:cool-{i}"
            for k, (text, dt) in enumerate(
                (("help, my build is broken", 0.0), ("still need help with it", 120.0))
            ):
                expected = ["ack-received", "help-desk"] if k == 0 else ["ack-received"]
                at = t + 5000 + i * 1000 + dt
                self._message(
                    at, session, "telegram", "dana", text, expected, "help cooldown" if k else "help"
                )
            for k, (text, dt) in enumerate(
                (("urgent: the site is down", 200.0), ("urgent: still down", 260.0))
            ):
                expected = ["urgent-page"] if k == 0 else ["ack-received"]
                at = t + 5000 + i * 1000 + dt
                note = "urgent cooldown" if k else "urgent"
                self._message(at, f"slack:ucool-{i}", "slack", "erin", text, expected, note)
        self.t += 20000

    def reaction_origin(self) -> None:
        """3. Messages caused by reactions never trigger anything (default recursion guard)."""
        for i in range(12):
            self.n += 1
            self.t += 1
            n = self.n
            self.add(
                ev(
                    f"run:{n}",
                    "message_received",
                    self.t,
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

    def _run_event(self, type_: str, at: float, expected: list[str], note: str, **fields: Any) -> None:
        self.n += 1
        self.add(ev(f"run:{self.n}", type_, at, **fields), expected, note)

    def run_errors(self) -> None:
        """4a. Run errors, their apology cooldown, and errors of runs a reaction started."""
        kinds = ["timeout", "agent", "restart", "cancel_deadline", "timeout", "agent"]
        for i in range(24):
            self.t += 100
            kind = kinds[i % len(kinds)]
            expected = ([] if kind == "restart" else ["run-error-apology"]) + (
                ["run-timeout-status"] if kind == "timeout" else []
            )
            fields = {"session_key": f"cli:e{i}", "channel": "cli"}
            self._run_event(
                "run_error",
                self.t,
                expected,
                f"run error {kind}",
                **fields,
                run_id=f"run_{i}",
                error_kind=kind,
            )
            if i < 6 and kind != "restart":
                # A second error in the same session within a minute: no second apology.
                self._run_event(
                    "run_error",
                    self.t + 10,
                    [],
                    "run error apology cooldown",
                    **fields,
                    run_id=f"run_b{i}",
                    error_kind="agent",
                )
        for i in range(4):  # a run started by a reaction's message fails: no reaction to it
            self.t += 100
            self._run_event(
                "run_error",
                self.t,
                [],
                "reaction-caused run error",
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
            )

    def run_events(self) -> None:
        """4b. Completed (long answers), cancelled and started runs."""
        for i, length in enumerate([10, 500, 1999, 2000, 2001, 5000, 12000, 80]):
            self.t += 1
            self._run_event(
                "run_completed",
                self.t,
                ["long-answer-canvas"] if length > 2000 else [],
                f"answer of {length} characters",
                session_key=f"cli:c{i}",
                channel="cli",
                run_id=f"run_c{i}",
                text="x" * length,
            )
        for i, channel in enumerate(["telegram", "slack", "telegram", "cli", "telegram", "voice-demo"]):
            self.t += 1
            self._run_event(
                "run_cancelled",
                self.t,
                ["cancel-ack"] if channel == "telegram" else [],
                "run cancelled",
                session_key=f"{channel}:x{i}",
                channel=channel,
                run_id=f"run_x{i}",
                attributes={"reason": "user"},
            )
        for i in range(6):
            self.t += 1
            self._run_event(
                "run_started",
                self.t,
                [],
                "run started",
                session_key=f"cli:s{i}",
                channel="cli",
                run_id=f"run_s{i}",
            )

    def node_events(self) -> None:
        """5. Node and canvas events, and tts fallbacks."""
        for i, role in enumerate(["desktop", "phone", "desktop", "desktop", "phone", "kiosk"]):
            self.m += 1
            self.t += 1
            self.add(
                ev(
                    f"node:{self.m}",
                    "node_connected",
                    self.t,
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
            self.m += 1
            self.t += 1
            self.add(
                ev(
                    f"node:{self.m}",
                    "node_disconnected",
                    self.t,
                    node_id=f"node-{i}",
                    node_role="desktop",
                    attributes={"reason": reason},
                ),
                ["node-lost-alert"] if reason == "lease_expired" else [],
                f"disconnect {reason}",
            )
        for i in range(4):
            self.m += 1
            self.t += 1
            self.add(
                ev(f"node:{self.m}", "canvas_changed", self.t, artifact_name=f"welcome/node-{i}"),
                [],
                "canvas changed",
            )
        for i, channel in enumerate(["voice-demo", "voice-demo", "telegram", "voice-demo"]):
            self.n += 1
            self.t += 1
            self.add(
                ev(
                    f"tts:{i}",
                    "tts_fallback",
                    self.t,
                    session_key=f"{channel}:v{i}",
                    channel=channel,
                    attributes={"reason": "timeout"},
                ),
                ["tts-fallback-note"] if channel == "voice-demo" else [],
                "tts fallback",
            )


def main() -> None:
    corpus = _Corpus()
    corpus.messages()
    corpus.cooldowns()
    corpus.reaction_origin()
    corpus.run_errors()
    corpus.run_events()
    corpus.node_events()
    rows = sorted(corpus.rows, key=lambda r: r["at"])
    with OUT.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} events to {OUT}")


if __name__ == "__main__":
    main()
