"""Autoscaling: how many replicas a service should run for the requests it is asked to serve at
once (its concurrency, in flight plus held, as the proxy sees it). Pure: samples and the clock
come in as arguments; no I/O.

The algorithm (Knative's KPA for the signal, Kubernetes' HPA for the bounds):
* The proxy's concurrency is sampled every 100 ms and averaged per second. The stable average
  covers ``window`` (60 s), the panic average its tenth (6 s).
* ``desired = ceil(stable / target)``, unchanged while the stable average is within 10% of what
  the current replicas take (``current * target``).
* Panic: when the panic average reaches twice what the ready replicas take (or anything at all
  arrives with none ready), scale on the panic average at once, and do not scale down until a
  whole window has passed without panic.
* Bounds: ``min`` and ``max``; a step up adds at most ``max(4, 3 * current)`` replicas; a step
  down removes at most half, at most once per 15 s, and only to the highest recommendation of the
  last ``down_window`` (5 min), so oscillating load does not flap.
* Scale to zero (``min = 0``): after ``idle`` with no request at all; the first request is held
  while a replica starts.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Mapping
from dataclasses import dataclass

from stablenet.config import ControllerConfig
from stablenet.controller.spec import MANAGING
from stablenet.docker.translate import LABEL, LabelError
from stablenet.units import parse_duration

MIN, MAX, TARGET = MANAGING[2:]
WINDOW = LABEL + "scale.window"
DOWN_WINDOW = LABEL + "scale.down_window"
IDLE = LABEL + "scale.idle"
SCALE_LABELS = (MIN, MAX, TARGET, WINDOW, DOWN_WINDOW, IDLE)
TOLERANCE = 0.1
PANIC_FACTOR = 2.0
DOWN_PERIOD = 15.0  # at most one step down per this many seconds
SAMPLE = 0.1  # seconds between concurrency samples
UP_PERIOD = 15.0  # a step up adds at most max(4, 3x) to the count at the period's start
MIN_TARGET = 0.01
MAX_WINDOW = 3600.0


@dataclass(frozen=True, slots=True)
class ScaleSpec:
    min: int
    max: int
    target: float  # requests in flight per ready replica
    window: float  # stable window, seconds
    down_window: float  # scale-down stabilization, seconds
    idle: float  # no request for this long: scale to zero (min 0 only)

    @property
    def panic_window(self) -> float:
        return max(1.0, self.window / 10)


def is_autoscaled(labels: Mapping[str, str]) -> bool:
    return MIN in labels or MAX in labels or TARGET in labels


def scale_spec(labels: Mapping[str, str], name: str, defaults: ControllerConfig) -> ScaleSpec:
    """The autoscaling a container's labels ask for, defaults from the [controller] section.
    Raises LabelError naming the label and what is accepted."""

    def bad(label: str, problem: str) -> LabelError:
        return LabelError(
            f"container {name}: label {label}={labels[label]!r} is not valid: {problem}"
        )

    def count(label: str, default: int) -> int:
        if label not in labels:
            return default
        text = labels[label].strip()
        if not (text.isascii() and text.isdigit()) or int(text) > 1000:
            raise bad(label, "expected a whole number from 0 to 1000")
        return int(text)

    def duration(label: str, default: float) -> float:
        if label not in labels:
            return default
        try:
            value = parse_duration(labels[label])
        except ValueError as exc:
            raise bad(label, str(exc)) from None
        if not 0 < value <= MAX_WINDOW:
            raise bad(label, "expected a duration above zero, at most 1h")
        return value

    low = count(MIN, defaults.replicas_min)
    high = count(MAX, max(defaults.replicas_max, low, 1))
    if high < max(low, 1):
        raise bad(MAX, f"expected at least {max(low, 1)} (stablenet.replicas.min, and 1)")
    target = defaults.scale_target
    if TARGET in labels:
        try:
            target = float(labels[TARGET])
        except ValueError:
            target = -1.0
        if not MIN_TARGET <= target <= 100_000:  # NaN fails too
            raise bad(TARGET, "expected requests in flight per replica from 0.01 to 100000")
    window = duration(WINDOW, defaults.scale_window)
    down = duration(DOWN_WINDOW, defaults.scale_down_window)
    idle = duration(IDLE, defaults.scale_idle or down)
    return ScaleSpec(low, high, target, window, down, idle)


@dataclass(frozen=True, slots=True)
class Recommendation:
    desired: int
    stable: float  # average concurrency over the stable window
    panic: float  # over the panic window
    panicking: bool
    reason: str


class Scaler:
    """One service's samples and the state its recommendations carry (panic, last step down,
    the recent recommendations). Times are the caller's clock, in seconds."""

    def __init__(self, spec: ScaleSpec, now: float, current: int) -> None:
        self.spec = spec
        self.started = now
        self.seconds: collections.deque[tuple[float, float]] = collections.deque()
        self.history: collections.deque[tuple[float, int]] = collections.deque([(now, current)])
        # A fresh scaler of a running service counts as active (no scale to zero at once); one
        # of a service already at zero stays there until a request comes.
        self.last_active = now if current else -math.inf
        self.period_start = now
        self.period_base = current
        self.panic_until = 0.0
        self.last_down = 0.0
        self._second = math.floor(now)
        self._sum = 0.0
        self._count = 0
        self.last: Recommendation | None = None

    def sample(self, now: float, concurrency: float, active: bool) -> None:
        """One 100 ms sample: requests in flight and held, and whether any request came since
        the last sample (a short request can start and end between two samples)."""
        second = math.floor(now)
        if second != self._second and self._count:
            self.seconds.append((float(self._second), self._sum / self._count))
            self._sum, self._count = 0.0, 0
        self._second = second
        self._sum += concurrency
        self._count += 1
        if active or concurrency > 0:
            self.last_active = now
        horizon = now - self.spec.window - 1
        while self.seconds and self.seconds[0][0] < horizon:
            self.seconds.popleft()

    def average(self, now: float, span: float) -> float:
        values = [v for t, v in self.seconds if t >= now - span]
        if self._count:
            values.append(self._sum / self._count)
        return sum(values) / len(values) if values else 0.0

    def recommend(self, now: float, current: int, ready: int) -> Recommendation:
        spec = self.spec
        stable = self.average(now, spec.window)
        panic = self.average(now, spec.panic_window)
        if panic > 0 and panic >= PANIC_FACTOR * ready * spec.target:
            self.panic_until = now + spec.window
        panicking = now < self.panic_until
        if panicking:
            want = max(math.ceil(panic / spec.target), current, 1 if panic > 0 else 0)
            why = f"panic: concurrency {panic:.1f} over {spec.panic_window:g}s"
        else:
            want = math.ceil(stable / spec.target - 1e-9)
            if current > 0 and abs(stable / (current * spec.target) - 1) <= TOLERANCE:
                want = current
            why = f"concurrency {stable:.1f}"
        idle = now - self.last_active >= spec.idle
        if want == 0 and not idle:
            want = 1  # requests within the idle time keep one replica
        if idle and spec.min == 0 and not panicking:
            return self._keep(now, 0, stable, panic, f"no request for {spec.idle:g}s")
        want = min(max(want, spec.min), spec.max)
        if now - self.period_start >= UP_PERIOD:
            self.period_start, self.period_base = now, current
        if want > current:
            base = self.period_base
            want = max(current, min(want, base + max(4, 3 * base)))
        self.history.append((now, want))
        while self.history and self.history[0][0] < now - spec.down_window:
            self.history.popleft()
        if want < current:
            observed = now - self.started >= spec.window
            if panicking or not observed or now - self.last_down < DOWN_PERIOD:
                want = current
            else:
                want = max(want, max(w for _, w in self.history))
                want = max(want, current - max(1, current // 2))
                if want < current:
                    self.last_down = now
        reason = f"{why} / target {spec.target:g} -> {want} replicas"
        return self._keep(now, want, stable, panic, reason, panicking)

    def _keep(
        self,
        now: float,
        desired: int,
        stable: float,
        panic: float,
        reason: str,
        panicking: bool = False,
    ) -> Recommendation:
        self.last = Recommendation(desired, stable, panic, panicking, reason)
        return self.last
