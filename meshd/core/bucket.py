"""A token bucket driven by the caller's clock (sans-IO): `rate` per second, up to `burst` saved."""

from __future__ import annotations

__all__ = ["TokenBucket"]


class TokenBucket:
    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst  # start full: a fresh node may learn a whole mesh at its join
        self._at = now

    def _refill(self, now: float) -> None:
        if now > self._at:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one; False means over the rate."""
        self._refill(now)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def ready_at(self, now: float) -> float:
        """When the next token is there (`now` when one is)."""
        self._refill(now)
        return now if self._tokens >= 1.0 else now + (1.0 - self._tokens) / self.rate
