"""Health state machine for one endpoint: active check results with rise/fall thresholds, and
passive outlier ejection from request outcomes with a backoff that grows on repeat.

Pure: every entry point takes ``now`` (and what the rest of the service looks like, as
``Peers``) and returns what changed; nothing sleeps or does I/O.

Transitions (one table, one place):

    UNKNOWN --pass--------------------------> UP      (routed after its first passing check)
    UNKNOWN --`fall` failures after grace---> DOWN    (a slow starter is not called unhealthy
                                                       before `start_grace` has passed)
    UP      --`fall` failures in a row------> DOWN
    DOWN    --`rise` passes in a row--------> UP
    UP      --`eject_after` failed requests-> EJECTED (for eject_time * 2**n, capped), unless
                                                       ejection_refusal() says no: it is the
                                                       last ready endpoint of its service, or
                                                       max_ejection_percent are out already
    EJECTED --deadline passed, probe passes-> UP
    EJECTED --deadline passed, probe fails--> EJECTED again, longer
    EJECTED --its service has no ready------> deadline now: probed at once (recall(); only an
              endpoint left                   ejection that no failed probe has confirmed)
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)

STARTING_INTERVAL = 0.25  # seconds between checks of an endpoint that has never passed
# ... and in its first second: a container started from scratch (a cold start, a replacement)
# usually listens within it, and each check saved is latency for the requests held meanwhile.
FIRST_SECOND_INTERVAL = 0.05


class Health(enum.Enum):
    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"
    EJECTED = "ejected"


@dataclass(frozen=True, slots=True)
class Thresholds:
    rise: int = 1
    fall: int = 3
    eject_after: int = 5  # consecutive failed requests; 0 turns passive ejection off
    eject_time: float = 5.0
    eject_max: float = 300.0
    start_grace: float = 20.0  # seconds a new endpoint may fail before it counts as down
    max_ejection_percent: int = 50  # of a service's endpoints ejected at once (at least one)


class Refusal(enum.Enum):
    """Why passive detection left an endpoint routed although its failures reached the limit."""

    LAST_READY = "last_ready"
    MAX_PERCENT = "max_ejection_percent"


@dataclass(frozen=True, slots=True)
class Peers:
    """The service of the endpoint in question, as passive ejection weighs it."""

    endpoints: int  # endpoints of the service that are not draining, this one included
    ejected: int  # of those, passively ejected now
    other_ready: int  # ready (routed) endpoints besides this one


def ejection_refusal(peers: Peers, max_percent: int) -> Refusal | None:
    """Why passive detection may not eject one more endpoint of this service, or None.

    A request's failure may be the request's own doing (one that crashes every backend), so
    failures alone never empty a service: the last ready endpoint stays, and at most
    ``max_percent`` of the endpoints (at least one) are out at a time. Active checks are not
    bound by this: a failing check still marks an endpoint down."""
    if peers.other_ready < 1:
        return Refusal.LAST_READY
    if peers.ejected + 1 > max(1, peers.endpoints * max_percent // 100):
        return Refusal.MAX_PERCENT
    return None


@dataclass(slots=True)
class EndpointHealth:
    """Mutable per-endpoint state owned by the health checker."""

    limits: Thresholds
    health: Health = Health.UNKNOWN
    passes: int = 0  # consecutive passing checks
    failures: int = 0  # consecutive failing checks
    request_failures: int = 0  # consecutive failed requests seen by the proxy
    ejections: int = 0  # how many times in a row it was ejected (grows the backoff)
    ejected_until: float = 0.0
    last_ejected: float = float("-inf")
    reason: str = "not checked yet"
    held_back: Refusal | None = None  # why it was not ejected when its failures said so
    unconfirmed: bool = False  # ejected on request failures alone; no probe has failed since
    first_check: float | None = None

    @property
    def routed(self) -> bool:
        return self.health is Health.UP

    def _move(self, to: Health, reason: str) -> None:
        if to is not self.health:
            logger.debug("health %s -> %s (%s)", self.health.value, to.value, reason)
        self.health = to
        self.reason = reason

    def check_result(self, passing: bool, reason: str, now: float) -> bool:
        """Record an active check (or a probe after ejection). True when ``routed`` changed."""
        if self.first_check is None:
            self.first_check = now
        if passing:
            self.passes += 1
            self.failures = 0
        else:
            self.failures += 1
            self.passes = 0
        was = self.routed
        match self.health, passing:
            case Health.UNKNOWN, True:
                self._move(Health.UP, reason)
            case Health.UNKNOWN, False if (
                self.failures >= self.limits.fall
                and now - self.first_check >= self.limits.start_grace
            ):
                self._move(Health.DOWN, reason)
            case Health.UP, False if self.failures >= self.limits.fall:
                self._move(Health.DOWN, reason)
            case Health.DOWN, True if self.passes >= self.limits.rise:
                self._move(Health.UP, reason)
            case Health.EJECTED, True if now >= self.ejected_until:
                self.request_failures = 0
                self._move(Health.UP, f"{reason} (back after ejection)")
            case Health.EJECTED, False if now >= self.ejected_until:
                self._eject(now, f"still failing after ejection: {reason}", unconfirmed=False)
            case _:
                if self.health is not Health.EJECTED:
                    self.reason = reason
        return was is not self.routed

    def request_ok(self) -> None:
        """A proxied request succeeded: the run of failures is over."""
        self.request_failures = 0
        self.held_back = None

    def request_failed(self, reason: str, now: float, peers: Peers) -> bool:
        """A proxied request failed (a connection failure or a 5xx). Ejects after
        ``eject_after`` in a row unless ``ejection_refusal`` says no; then the count goes on and
        the next failure asks again. True when ``routed`` changed."""
        self.request_failures += 1
        limit = self.limits.eject_after
        if limit <= 0 or self.health is Health.EJECTED or self.request_failures < limit:
            return False
        refusal = ejection_refusal(peers, self.limits.max_ejection_percent)
        if refusal is not None:
            self.held_back = refusal
            return False
        was = self.routed
        why = f"ejected after {self.request_failures} failed requests: {reason}"
        self._eject(now, why, unconfirmed=True)
        return was is not self.routed

    def recall(self, now: float) -> bool:
        """Its service has no ready endpoint left: an ejection that rests on request failures
        alone ends its wait, so the probe (an active check) decides at once whether it is back.
        True when the probe was brought forward."""
        if self.health is not Health.EJECTED or not self.unconfirmed or self.ejected_until <= now:
            return False
        self.ejected_until = now
        self.unconfirmed = False
        return True

    def _eject(self, now: float, reason: str, unconfirmed: bool) -> None:
        if now - self.last_ejected > self.limits.eject_max * 2:
            self.ejections = 0  # it behaved for a long while: start the backoff over
        backoff = min(self.limits.eject_time * 2**self.ejections, self.limits.eject_max)
        self.ejections += 1
        self.last_ejected = now
        self.ejected_until = now + backoff
        self.request_failures = 0
        self.held_back = None
        self.unconfirmed = unconfirmed
        self._move(Health.EJECTED, f"{reason}; probing again in {backoff:g}s")

    def next_check(self, interval: float, now: float) -> float:
        """When the next active check or probe is due. While it has never passed (a container
        that is starting), check often during the grace period so it is routed soon after it
        starts listening."""
        if self.health is Health.EJECTED:
            return max(self.ejected_until, now)
        if self.health is Health.UNKNOWN and (
            self.first_check is None or now - self.first_check < self.limits.start_grace
        ):
            if self.first_check is None or now - self.first_check < 1.0:
                return now + min(interval, FIRST_SECOND_INTERVAL)
            return now + min(interval, STARTING_INTERVAL)
        return now + interval
