"""Balancing: choose one READY endpoint of a service for a request. Pure: no I/O, no clock; the
randomness source is a parameter. Owns the per-endpoint count of requests in flight and the
round-robin positions; nothing here knows sockets or the registry's machinery."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Collection, Sequence

from stablenet.model import Endpoint

POLICIES = ("p2c", "round_robin", "least_requests")

# What identifies one incarnation of an endpoint: a restarted container is a new one, even when
# it gets its old address back, so a request that failed on the old one may try the new one.
Target = tuple[str, str, int, float]


RETRY_FIRST = 0.05  # seconds before a request that failed on every ready endpoint tries again
RETRY_MAX = 1.0


def retry_backoff(previous: float, now: float, deadline: float) -> tuple[float, float]:
    """When every ready endpoint failed a request or connection (typically a single replica
    back in the registry but not listening yet): how long to wait before trying them all
    again, never past ``deadline``, and the wait to pass as ``previous`` next time. Starts at
    RETRY_FIRST (``previous`` 0) and doubles up to RETRY_MAX."""
    wait = min(previous or RETRY_FIRST, RETRY_MAX, max(0.0, deadline - now))
    return wait, min(wait * 2, RETRY_MAX)


def target_of(ep: Endpoint) -> Target:
    return (ep.id, ep.address, ep.port or 0, ep.started_at)


def sticky_token(ep: Endpoint) -> str:
    """The opaque cookie value that pins a client to this endpoint (no container id leaks)."""
    return hashlib.blake2s(ep.id.encode(), digest_size=8).hexdigest()


class Balancer:
    """Picks endpoints under one policy and counts requests in flight per endpoint id.

    ``pick`` takes the READY endpoints of a service (already in a stable order) and the targets
    this request already failed on; ``begin``/``end`` bracket each request sent to an endpoint.
    """

    __slots__ = ("policy", "inflight", "_rng", "_rr", "_wrr")

    def __init__(self, policy: str = "p2c", rng: random.Random | None = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown balancing policy {policy!r}; expected one of {POLICIES}")
        self.policy = policy
        self.inflight: dict[str, int] = {}
        self._rng = rng or random.Random()
        self._rr: dict[str, int] = {}  # service -> next position (equal weights)
        self._wrr: dict[str, dict[str, int]] = {}  # service -> id -> current weight (smooth WRR)

    def begin(self, ep: Endpoint) -> None:
        self.inflight[ep.id] = self.inflight.get(ep.id, 0) + 1

    def end(self, ep: Endpoint) -> None:
        left = self.inflight.get(ep.id, 0) - 1
        if left > 0:
            self.inflight[ep.id] = left
        else:
            self.inflight.pop(ep.id, None)

    def pick(
        self,
        service: str,
        ready: Sequence[Endpoint],
        tried: Collection[Target] = (),
    ) -> Endpoint | None:
        """One endpoint of ``ready`` not in ``tried``, or None when there is none."""
        if tried:
            ready = [ep for ep in ready if target_of(ep) not in tried]
        n = len(ready)
        if n == 0:
            return None
        if n == 1:
            return ready[0]
        weighted = any(ep.weight != 1 for ep in ready)
        if self.policy == "p2c":
            return self._p2c(ready, weighted)
        if self.policy == "round_robin":
            return self._wrr_pick(service, ready) if weighted else self._rr_pick(service, ready)
        return self._least(service, ready)

    def _load(self, ep: Endpoint) -> float:
        return (self.inflight.get(ep.id, 0) + 1) / max(ep.weight, 1)

    def _p2c(self, ready: Sequence[Endpoint], weighted: bool) -> Endpoint:
        weights = [max(ep.weight, 0) for ep in ready] if weighted else []
        if weighted and not any(weights):
            weighted = False  # only weight-0 endpoints are left: treat them alike
        if weighted:
            a, b = self._rng.choices(ready, weights=weights, k=2)
            if a is b:
                return a
        else:
            n = len(ready)
            i = self._rng.randrange(n)
            j = self._rng.randrange(n - 1)
            if j >= i:
                j += 1
            a, b = ready[i], ready[j]
        return b if self._load(b) < self._load(a) else a

    def _rr_pick(self, service: str, ready: Sequence[Endpoint]) -> Endpoint:
        pos = self._rr.get(service, 0)
        self._rr[service] = pos + 1
        return ready[pos % len(ready)]

    def _wrr_pick(self, service: str, ready: Sequence[Endpoint]) -> Endpoint:
        """Smooth weighted round robin: each endpoint gains its weight, the richest is picked
        and pays the total. Spreads a 3:1 split as a a b a rather than a a a b."""
        current = self._wrr.setdefault(service, {})
        ids = {ep.id for ep in ready}
        for gone in [cid for cid in current if cid not in ids]:
            del current[gone]
        total = 0
        best: Endpoint | None = None
        best_value = 0
        for ep in ready:
            weight = max(ep.weight, 0)
            total += weight
            value = current.get(ep.id, 0) + weight
            current[ep.id] = value
            if best is None or value > best_value:
                best, best_value = ep, value
        assert best is not None
        current[best.id] = best_value - total
        return best

    def _least(self, service: str, ready: Sequence[Endpoint]) -> Endpoint:
        """Fewest requests in flight per unit of weight; ties rotate so idle replicas share."""
        n = len(ready)
        start = self._rr.get(service, 0)
        self._rr[service] = start + 1
        best = ready[start % n]
        best_load = self._load(best)
        for k in range(1, n):
            ep = ready[(start + k) % n]
            load = self._load(ep)
            if load < best_load:
                best, best_load = ep, load
        return best
