"""Token buckets for send rates and handshake storms."""

from __future__ import annotations


class TokenBucket:
    """`rate` tokens per second, holding at most `burst`; the clock is passed in."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp: float | None = None

    def take(self, now: float, count: float = 1.0) -> float:
        """Take `count` tokens; return 0 when granted, else the seconds to wait before trying again."""
        if self.stamp is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= count:
            self.tokens -= count
            return 0.0
        return (count - self.tokens) / self.rate

    def charge(self, now: float, count: float = 1.0) -> float:
        """Take `count` tokens even when short, going into debt; return the seconds until it is repaid."""
        if self.stamp is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= count
        return max(0.0, -self.tokens / self.rate)
