"""When a failed attempt may be tried again: the proxy's retry rules as one pure decision, and the
per-service retry budget. No I/O, no clock: time is a parameter.

The rules (the README states them the same way):

1. A request that never reached a backend (the connection was refused or timed out) may go to
   another endpoint, or to the same one after a backoff, until the hold timeout.
2. Once any response byte reached the client, nothing is retried: the client connection is cut.
3. A request that is not idempotent (POST, PATCH, ...) is never sent twice once any of it may
   have been written. (It avoids the keep-alive race instead: see ``reuse_ok``.)
4. An idempotent request whose backend failed before any response byte reached the client may
   be sent again, to an endpoint it was not sent to before, at most ``retries`` more times, and
   only while the service's retry budget allows (retries at most ``percent`` of its requests
   over the last ``window`` seconds, plus a small floor per second).
5. An idempotent request sent on a reused keep-alive connection that the backend closed before
   answering a single byte (the keep-alive race: it closed an idle connection as we wrote) is
   sent once more on a fresh connection, which the budget does not pay for but which counts
   against ``retries``: however a request fails, it reaches backends at most ``retries`` + 1
   times.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from stablenet.proxy.exchange import (
    CONNECTING,
    HEAD_PENDING,
    SENT,
)


class Verdict(enum.Enum):
    RETRY = "retry"  # to another endpoint (or, for a refused connection, later)
    RETRY_FRESH = "retry-fresh"  # the keep-alive race: same endpoint, new connection
    FAIL = "fail"  # answer the client with an error (or cut it, when it saw bytes)


@dataclass(frozen=True, slots=True)
class Attempt:
    """What is known about one failed attempt."""

    phase: int  # where the exchange was when it failed (exchange.Phase)
    idempotent: bool  # RFC 9110 9.2.2
    replayable: bool  # the whole request body is still held (and it is no Upgrade/CONNECT)
    reused: bool  # sent on a pooled keep-alive connection
    got_bytes: bool  # the backend sent anything on this connection for this request
    client_saw: bool  # some response byte reached the client
    sends: int  # attempts that wrote the request, this one included
    race_retried: bool  # the keep-alive race was already retried once


def decide(attempt: Attempt, retries: int, budget_ok: bool) -> Verdict:
    """Whether a failed attempt may be retried, and how. Pure; see the module's rules."""
    if attempt.client_saw:
        return Verdict.FAIL
    if attempt.phase == CONNECTING:
        return Verdict.RETRY  # rule 1: nothing was written
    if attempt.phase not in (SENT, HEAD_PENDING):
        return Verdict.FAIL  # upgrade pending, tunnel, streaming: never replayed
    if not attempt.idempotent or not attempt.replayable:
        return Verdict.FAIL  # rule 3
    if attempt.sends > retries:
        return Verdict.FAIL  # rules 4 and 5: at most ``retries`` more sends, whatever the cause
    if attempt.reused and not attempt.got_bytes and not attempt.race_retried:
        return Verdict.RETRY_FRESH  # rule 5
    if not budget_ok:
        return Verdict.FAIL
    return Verdict.RETRY  # rule 4


def reuse_ok(idempotent: bool, idle: float, limit: float) -> bool:
    """May a pooled connection idle for ``idle`` seconds carry this request? A request that is
    not idempotent cannot be replayed when the backend closes the connection as it is written,
    so it takes only connections idle for less than ``limit`` (well under the keep-alive
    timeout of common servers: 2 s for gunicorn, 5 s for Node.js and Apache), else a fresh
    one."""
    return idempotent or idle < limit


BUCKET: Final = 1.0  # seconds per bucket of the budget's window


class RetryBudget:
    """Retries allowed for one service: at most ``percent`` of its requests over the last
    ``window`` seconds, plus ``floor`` per second so that a quiet service can still retry
    (Finagle's RetryBudget, Envoy's retry budget). It costs a request nothing: ``tick`` reads the
    service's request count now and then (the proxy's sweep, several times a second);
    ``allows`` before a retry and ``spend`` when it is made."""

    __slots__ = ("percent", "floor", "window", "_requests", "_retries", "_at", "_total")

    def __init__(self, percent: float = 20.0, floor: float = 3.0, window: float = 10.0) -> None:
        self.percent = percent
        self.floor = floor
        self.window = max(1, int(window / BUCKET))
        self._requests = [0] * self.window
        self._retries = [0] * self.window
        self._at = 0  # the bucket number (time // BUCKET) last written
        self._total = -1  # the request count at the last tick (-1: none yet)

    def _bucket(self, now: float) -> int:
        at = int(now // BUCKET)
        if at != self._at:
            span = min(at - self._at, self.window) if at > self._at else self.window
            for step in range(1, span + 1):
                i = (self._at + step) % self.window
                self._requests[i] = 0
                self._retries[i] = 0
            self._at = at
        return at % self.window

    def tick(self, now: float, requests: int) -> None:
        """The service has had ``requests`` requests in all by ``now``: those since the last
        tick count in the current bucket."""
        i = self._bucket(now)
        if self._total >= 0:
            self._requests[i] += requests - self._total
        self._total = requests

    def allows(self, now: float) -> bool:
        """Whether one more retry fits the budget now."""
        self._bucket(now)
        allowed = sum(self._requests) * self.percent / 100 + self.floor * self.window * BUCKET
        return sum(self._retries) < allowed

    def spend(self, now: float) -> None:
        """A retry was made."""
        self._retries[self._bucket(now)] += 1
