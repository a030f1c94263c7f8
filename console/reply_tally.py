"""Counts of final replies by channel, delivery mode and engine, and of TTS fallback reasons.

The console tallies every reply it relays from StreamReplies (the page is sent only the latest ones),
so the Voice view's counts cover the whole retained history, however long.
"""

from __future__ import annotations

from collections import Counter
from typing import Any


class ReplyTally:
    def __init__(self) -> None:
        self.by_mode: Counter[tuple[str, str, str]] = Counter()
        self.reasons: Counter[str] = Counter()
        self.finals = 0
        self.fallbacks = 0

    def add(self, reply: dict[str, Any]) -> None:
        if reply.get("kind") != "final":
            return
        self.finals += 1
        delivery = str(reply.get("delivery", ""))
        self.by_mode[(str(reply.get("channel", "")), delivery, str(reply.get("engine") or "—"))] += 1
        if delivery == "text_after_fallback":
            self.fallbacks += 1
            self.reasons[str(reply.get("tts_fallback_reason") or "?")] += 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "finals": self.finals,
            "fallbacks": self.fallbacks,
            "by_mode": [
                {"channel": c, "delivery": d, "engine": e, "count": n}
                for (c, d, e), n in sorted(self.by_mode.items())
            ],
            "reasons": [{"reason": r, "count": n} for r, n in sorted(self.reasons.items())],
        }
