"""A token bucket: how often a guest may make the host do work on its behalf (registrations)."""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """At most `burst` events at once, then `rate_per_s` on average; take() says whether one may happen now."""

    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()

    def take(self) -> bool:
        """Spend one token if there is one (True), else refuse (False)."""
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate_per_s)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False
