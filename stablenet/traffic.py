"""Traffic history: the last minutes of per-second figures per service (requests/s, 5xx/s, p99
latency, requests in flight and held, ready and desired replicas) for the status page's charts
and the admin API.

``History.record(now, readings)`` is pure (time is a parameter): it turns cumulative counters
into rates over the interval since the last reading and keeps them in bounded ring buffers, one
per service; a service with no reading for longer than the history is dropped. ``read_figures``
and ``Sampler`` are the thin shell: once a second they read what the proxy and the registry
already keep. Nothing here runs on the request path or writes to what it reads."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from array import array
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from stablenet.histogram import LATENCY_BUCKETS

if TYPE_CHECKING:
    from stablenet.proxy import Proxy
    from stablenet.registry import Registry

logger = logging.getLogger(__name__)

DEFAULT_SPAN = 600.0  # seconds of history kept (admin.history)
INTERVAL = 1.0  # seconds between samples
# What each sample holds, in this order: requests/s, 5xx responses/s, p99 latency (seconds) of
# the requests that ended in the interval, requests in flight at endpoints, requests held
# waiting for a ready endpoint, ready replicas, desired replicas (managed services only).
FIELDS = ("requests", "errors", "p99", "in_flight", "held", "ready", "desired")
# Rates and latency are floats (NaN: unknown), rounded when recorded; gauges are whole numbers
# (NONE: unknown). A sample costs 48 bytes with its tick.
TYPECODES = ("d", "d", "d", "i", "i", "i", "i")
DIGITS = (3, 3, 6)
NAN = math.nan
NONE = -1

Desired = Callable[[], Mapping[str, int | None]]


@dataclass(frozen=True, slots=True)
class Reading:
    """One service at one instant: cumulative counters (``None`` when nothing counts them,
    e.g. with the proxy off) and gauges."""

    requests: int | None = None  # requests and TCP connections taken, since start
    errors: int | None = None  # 5xx responses, since start
    latency: tuple[int, ...] = ()  # cumulative per-bucket counts of request durations
    in_flight: int = 0
    held: int = 0
    ready: int = 0
    desired: int | None = None


def quantile(q: float, counts: tuple[int, ...], bounds: tuple[float, ...]) -> float:
    """The ``q`` quantile of observations counted per bucket (``counts[i]`` in
    ``(bounds[i-1], bounds[i]]``, the last one above every bound), interpolated linearly
    within its bucket as Prometheus' histogram_quantile does; NaN when nothing was counted.
    Observations above the last bound report the last bound."""
    total = sum(counts)
    if total <= 0:
        return NAN
    rank = q * total
    below = 0
    for i, count in enumerate(counts):
        if count and below + count >= rank:
            if i >= len(bounds):
                return bounds[-1]
            lower = bounds[i - 1] if i > 0 else 0.0
            return lower + (bounds[i] - lower) * (rank - below) / count
        below += count
    return bounds[-1]


def _delta(now: int | None, before: int | None) -> float:
    if now is None or before is None:
        return NAN
    return float(max(0, now - before))  # a counter never goes down; if one did, it restarted


def _bucket_deltas(now: tuple[int, ...], before: tuple[int, ...]) -> tuple[int, ...]:
    if len(before) != len(now):
        before = (0,) * len(now)
    return tuple(max(0, a - b) for a, b in zip(now, before, strict=True))


class Series:
    """One service's samples: a ring of at most ``capacity`` ticks, one compact array per
    field. It grows as samples come, so a short-lived service costs only what it recorded."""

    __slots__ = ("capacity", "columns", "last", "last_at", "last_tick", "next", "ticks")

    def __init__(self, capacity: int, reading: Reading, at: float, tick: int) -> None:
        self.capacity = capacity
        self.ticks = array("q")
        self.columns: tuple[array[Any], ...] = tuple(array(code) for code in TYPECODES)
        self.next = 0  # where the next sample goes once the ring is full
        self.last = reading  # the reading the next rates are measured from
        self.last_at = at
        self.last_tick = tick

    def append(self, tick: int, values: tuple[float | int, ...]) -> None:
        if len(self.ticks) < self.capacity:
            self.ticks.append(tick)
            for column, value in zip(self.columns, values, strict=True):
                column.append(value)
            return
        i = self.next
        self.ticks[i] = tick
        for column, value in zip(self.columns, values, strict=True):
            column[i] = value
        self.next = (i + 1) % self.capacity

    def span(self, after: int, upto: int) -> tuple[int, int]:
        """Where the samples of the ticks in (after, upto] are, counting from the oldest:
        walked from the newest, so asking for the last second or two costs a step or two."""
        ticks, size = self.ticks, len(self.ticks)
        start = self.next if size == self.capacity else 0
        hi = size
        while hi > 0 and ticks[(start + hi - 1) % size] > upto:
            hi -= 1
        lo = hi
        while lo > 0 and ticks[(start + lo - 1) % size] > after:
            lo -= 1
        return lo, hi

    def window(self, column: array[Any], lo: int, hi: int) -> array[Any]:
        """A column's (or ``ticks``') samples ``lo`` to ``hi``, counting from the oldest."""
        size = len(column)
        start = self.next if size == self.capacity else 0
        a, b = start + lo, start + hi
        if b <= size:
            return column[a:b]
        if a >= size:
            return column[a - size : b - size]
        return column[a:] + column[: b - size]


def _json(column: array[Any]) -> list[Any]:
    """A column's values for JSON: unknown ones (NaN, NONE) as null."""
    values = column.tolist()
    if column.typecode == "d":
        return [v if v == v else None for v in values]
    if NONE in column:
        return [None if v == NONE else v for v in values]
    return values


class History:
    """Per-service samples of the last ``span`` seconds, one per ``interval``. ``record`` is
    called once per interval; ``tick`` counts the calls and is the cursor readers pass as
    ``since``."""

    def __init__(
        self,
        span: float = DEFAULT_SPAN,
        interval: float = INTERVAL,
        bounds: tuple[float, ...] = LATENCY_BUCKETS,
    ) -> None:
        self.span = span
        self.interval = interval
        self.bounds = bounds
        self.capacity = max(1, math.ceil(span / interval))
        self.tick = 0
        self.series: dict[str, Series] = {}
        self._times = array("d", bytes(8 * self.capacity))  # tick % capacity -> time

    def record(self, now: float, readings: Mapping[str, Reading]) -> None:
        """Take one reading per present service at time ``now`` (seconds, wall clock).
        A service's first reading is only the base its rates start from; each later one adds a
        sample. Services absent for longer than the history are forgotten."""
        self.tick += 1
        tick = self.tick
        self._times[tick % self.capacity] = round(now, 3)
        for name, reading in readings.items():
            series = self.series.get(name)
            if series is None:
                self.series[name] = Series(self.capacity, reading, now, tick)
                continue
            series.append(tick, self._sample(series.last, reading, now - series.last_at))
            series.last, series.last_at, series.last_tick = reading, now, tick
        oldest = tick - self.capacity
        for name in [n for n, s in self.series.items() if s.last_tick <= oldest]:
            del self.series[name]

    def _sample(self, before: Reading, now: Reading, elapsed: float) -> tuple[float | int, ...]:
        if elapsed <= 0:  # the wall clock stepped back: assume one interval passed
            elapsed = self.interval
        p99 = NAN
        if now.latency and now.latency != before.latency:
            p99 = quantile(0.99, _bucket_deltas(now.latency, before.latency), self.bounds)
        return (
            round(_delta(now.requests, before.requests) / elapsed, DIGITS[0]),
            round(_delta(now.errors, before.errors) / elapsed, DIGITS[1]),
            round(p99, DIGITS[2]),
            now.in_flight,
            now.held,
            now.ready,
            NONE if now.desired is None else now.desired,
        )

    def samples(self, name: str, since: int = 0, upto: int | None = None) -> dict[str, Any] | None:
        """A service's samples of the ticks after ``since`` up to ``upto`` (the newest) within
        the history, as JSON: ``t`` (the sample's time) and one list per field, oldest first;
        ``None`` for an unknown service."""
        series = self.series.get(name)
        if series is None:
            return None
        lo, hi = series.span(
            max(since, self.tick - self.capacity), self.tick if upto is None else upto
        )
        times, capacity = self._times, self.capacity
        body: dict[str, Any] = {
            "t": [times[t % capacity] for t in series.window(series.ticks, lo, hi)]
        }
        for field, column in zip(FIELDS, series.columns, strict=True):
            body[field] = _json(series.window(column, lo, hi))
        return body

    def chunks(self, since: int = 0) -> Iterator[str]:
        """``as_json(since)`` as JSON text, one piece per service, for an answer written
        piece by piece: the loop may record between pieces, and every piece stops at the
        tick the answer names."""
        upto = self.tick
        yield json.dumps({"tick": upto, "interval": self.interval, "span": self.span})[:-1]
        yield ', "services": {'
        separator = ""
        for name in sorted(self.series):
            body = self.samples(name, since, upto)
            if body is not None and body["t"]:
                yield separator + json.dumps(name) + ": " + json.dumps(body)
                separator = ", "
        yield "}}"

    def as_json(self, since: int = 0) -> dict[str, Any]:
        """Every service's samples after tick ``since``; pass the returned ``tick`` next time
        to get only what is new."""
        services = {}
        for name in sorted(self.series):
            body = self.samples(name, since)
            if body is not None and body["t"]:
                services[name] = body
        return {
            "tick": self.tick,
            "interval": self.interval,
            "span": self.span,
            "services": services,
        }


def read_figures(
    registry: Registry, proxy: Proxy | None, desired: Desired | None = None
) -> dict[str, Reading]:
    """A reading for every service that has endpoints, is managed, or has requests held: the
    proxy's counters and gauges as they stand (read, never created) and the ready count."""
    snap = registry.snapshot
    wanted = dict(desired()) if desired is not None else {}
    names = set(snap.services) | set(wanted)
    if proxy is None:
        return {
            name: Reading(ready=len(snap.ready.get(name, ())), desired=wanted.get(name))
            for name in names
        }
    dispatcher = proxy.dispatcher
    names.update(name for name, waiting in dispatcher.waiters.items() if waiting)
    names.update(name for name, held in dispatcher.tcp_waiting.items() if held)
    errors: dict[str, int] = {}
    if dispatcher.metrics:
        for (service, _endpoint, cls), count in dispatcher.responses.items():
            if cls == "5xx":
                errors[service] = errors.get(service, 0) + count
    readings = {}
    for name in names:
        counters = dispatcher.counters.get(name)
        hist = dispatcher.latency.get(name)
        held = proxy.held(name)
        if dispatcher.metrics:
            failed = errors.get(name, 0)
        else:  # no per-response counts: the 5xx the proxy answered itself
            failed = counters.errors if counters is not None else 0
        readings[name] = Reading(
            requests=counters.requests if counters is not None else 0,
            errors=failed,
            latency=tuple(hist.counts) if hist is not None else (),
            in_flight=proxy.concurrency(name) - held,
            held=held,
            ready=len(snap.ready.get(name, ())),
            desired=wanted.get(name),
        )
    return readings


class Sampler:
    """Records ``read()`` into ``history`` once per interval, on the loop's clock (a late
    tick is not made up for: its rates cover the longer interval)."""

    def __init__(self, history: History, read: Callable[[], Mapping[str, Reading]]) -> None:
        self.history = history
        self.read = read

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.history.interval
        due = loop.time()
        while True:
            self.history.record(time.time(), self.read())
            due = max(due + interval, loop.time())
            await asyncio.sleep(due - loop.time())
