"""Pauses between attempts that double up to a limit (Wi-Fi, MQTT, SNTP; docs/network.md)."""
import random


def jitter(delay_ms):
    """Somewhere in the second half of the delay: a fleet that failed together spreads out."""
    half = delay_ms // 2
    return half + random.getrandbits(24) % (half + 1)


class Backoff:
    """next_ms() gives the pause, then doubles the next one up to hi_ms; reset() after a success.
    spread=False: the pause itself, no jitter (SNTP: RFC 4330 section 10's plain doubling)."""

    def __init__(self, lo_ms, hi_ms, spread=True):
        self.lo_ms = lo_ms
        self.hi_ms = hi_ms
        self._spread = spread
        self._ms = lo_ms

    def reset(self):
        self._ms = self.lo_ms

    def next_ms(self):
        delay = self._ms
        self._ms = min(delay * 2, self.hi_ms)
        return jitter(delay) if self._spread else delay
