"""A small in-memory rate limiter (GCRA: a token bucket kept as one timestamp per key).

Per process, like the rest of our in-memory limits: with M API workers behind the proxy an
attacker gets at most M times the configured rate. Pure: the clock is passed in.
"""

from __future__ import annotations


class RateLimiter:
    """`rate` events per `period` seconds per key, with bursts of up to `burst` events."""

    def __init__(
        self, rate: int, period: float = 60.0, burst: int | None = None, max_keys: int = 100_000
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self._interval = period / rate
        self._tolerance = self._interval * ((burst or rate) - 1)
        self._tat: dict[str, float] = {}  # key -> theoretical arrival time
        self._max_keys = max_keys

    def hit(self, key: str, now: float) -> float:
        """Record one event; 0.0 when allowed, else the seconds to wait (nothing recorded)."""
        tat = max(self._tat.get(key, now), now)
        allow_at = tat - self._tolerance
        if now < allow_at:
            return allow_at - now
        if key not in self._tat and len(self._tat) >= self._max_keys:
            self._evict(now)
        self._tat[key] = tat + self._interval
        return 0.0

    def _evict(self, now: float) -> None:
        # Keys whose bucket has refilled carry no information.
        for k in [k for k, t in self._tat.items() if t <= now]:
            del self._tat[k]
        if len(self._tat) >= self._max_keys:  # still full: forget the oldest half
            for k in sorted(self._tat, key=self._tat.__getitem__)[: self._max_keys // 2]:
                del self._tat[k]
