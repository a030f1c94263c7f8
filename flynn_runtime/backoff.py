"""Jittered exponential backoff for every reconnect loop (watchers, consumers, nodes, adapters).

Equal jitter: each delay is between half and all of the current step, so a restart storm of many
clients spreads out, yet none of them spins.
"""

from __future__ import annotations

import random


class Backoff:
    def __init__(self, initial: float = 0.1, maximum: float = 5.0, factor: float = 2.0) -> None:
        if initial <= 0 or maximum < initial or factor < 1:
            raise ValueError("backoff needs 0 < initial <= maximum and factor >= 1")
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self._step = initial

    def next_delay(self) -> float:
        """The delay before the next attempt; each call grows the step up to the maximum."""
        delay = self._step * random.uniform(0.5, 1.0)
        self._step = min(self._step * self.factor, self.maximum)
        return delay

    def reset(self) -> None:
        """Call after a success: the next failure waits the initial step again."""
        self._step = self.initial
