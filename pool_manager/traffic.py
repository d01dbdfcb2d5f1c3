"""How much a model is in demand: recency and frequency in one number (issue 16).

Each request adds 1 to a model's score, and the score halves every HALF_LIFE_SECONDS: a
model asked for ten times five minutes ago outranks one asked for once a minute ago,
and one nobody asked for in an hour has all but faded. The spares load ahead the COLD
models with the highest scores (ties: the most recently used, then registry order).
A policy without processes or clocks of its own: the pool passes the time in.
"""

from __future__ import annotations

from dataclasses import dataclass

HALF_LIFE_SECONDS = 600.0


@dataclass
class Demand:
    """One model's decayed request count."""

    score: float = 0.0
    at: float = 0.0  # monotonic time the score was last brought up to date

    def value(self, now: float) -> float:
        """The score as of `now`."""
        if self.score == 0.0:
            return 0.0
        return self.score * 0.5 ** (max(0.0, now - self.at) / HALF_LIFE_SECONDS)

    def add(self, now: float) -> None:
        """One more request, at `now`."""
        self.score = self.value(now) + 1.0
        self.at = now
