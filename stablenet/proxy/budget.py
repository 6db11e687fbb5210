"""The proxy's connection budget: how many client connections its listeners (HTTP and TCP) hold,
in all and per source address, and what gives way when a new one arrives past a limit, so that a
flood of connections can never take the descriptors the rest of the process needs.

``Budget`` is the pure bookkeeping: no sockets, no clock of its own. ``Gate``, at the bottom, is
the thin shell the listeners call on accept: it closes what the budget names and logs the
budget's rate-limited warning. Rules, for a new connection from source S (an IPv4 address, or the
/64 of an IPv6 address):

1. S already holds ``max_connections_per_source``: close S's oldest idle connection; none of
   S's oldest SCAN is idle: refuse the new one (reason ``max_connections_per_source``).
2. all sources together hold ``max_connections``: close the oldest idle connection, whoever
   holds it; none is idle: refuse (reason ``max_connections``).

Only idle connections are ever closed to make room: an HTTP keep-alive connection between
requests (nothing in flight, so closing it loses nothing). A connection is busy from its accept
until its first request is answered, and from the first byte of each request on; a TCP
connection is never idle. Each connection keeps its own ``idle_since`` (a plain attribute
write per request); the budget reads it only when it needs a victim.

Defaults (0 or "auto") follow the descriptor limit (RLIMIT_NOFILE, which the daemon raises to its
hard limit at start): a quarter of it, at most RESERVE_MAX, is kept for everything that is not a
client connection (admin API, DNS, health checks, listeners, the Docker API); half of the rest
goes to client connections, since each one in use may hold a backend connection as well; and a
source gets a quarter of that."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import resource
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

logger = logging.getLogger(__name__)

RESERVE_MAX = 1024  # descriptors kept for the rest of the process, at most
UNLIMITED_NOFILE = 1 << 20  # what an unlimited RLIMIT_NOFILE counts as
WARN_EVERY = 10.0  # seconds between two warnings that a limit was reached
SCAN = 1024  # connections looked at, oldest first, for one to close to make room
TOTAL = "max_connections"
PER_SOURCE = "max_connections_per_source"
REASONS = (TOTAL, PER_SOURCE)

C = TypeVar("C", bound=Hashable)


@dataclass(frozen=True, slots=True)
class Limits:
    """How many client connections the proxy holds, in all and per source address."""

    total: int
    per_source: int
    nofile: int  # the descriptor limit the defaults were taken from
    derived: int  # what the descriptor limit allows for ``total``

    @classmethod
    def derive(cls, total: int, per_source: int, nofile: int) -> Limits:
        """``total`` and ``per_source`` as configured, 0 meaning "from the descriptor limit"."""
        if nofile < 0:
            nofile = UNLIMITED_NOFILE
        reserve = min(RESERVE_MAX, nofile // 4)
        derived = max(1, (nofile - reserve) // 2)
        total = total or derived
        per_source = min(per_source or max(1, total // 4), total)
        return cls(total, per_source, nofile, derived)


def descriptor_limit() -> int:
    """The process's soft RLIMIT_NOFILE now (-1 when unlimited)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def source_of(address: str) -> str:
    """The key a client's connections are counted under: its IPv4 address (also when written
    as IPv4-mapped IPv6), or the /64 of its IPv6 address, since one host commonly holds a
    whole /64."""
    if ":" not in address:
        return address
    try:
        ip = ipaddress.IPv6Address(address.partition("%")[0])
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, 64), strict=False))


@dataclass(frozen=True, slots=True)
class Admission:
    """What became of a new connection: admitted or not, the limit that was reached (empty when
    none), and the idle connections to close to make room for it (the budget's own keys)."""

    admitted: bool
    reason: str = ""
    victims: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class Pressure:
    """What to warn about: connections refused and idle ones closed, by limit, since the last
    warning, and the state now."""

    refused: tuple[tuple[str, int], ...]
    closed_idle: tuple[tuple[str, int], ...]
    open: int
    limits: Limits
    busiest: tuple[str, int]  # the source holding most connections, and how many

    def message(self) -> str:
        def counts(pairs: tuple[tuple[str, int], ...]) -> str:
            return ", ".join(f"{n} at {reason}" for reason, n in pairs if n) or "none"

        return (
            f"proxy connection limit reached: refused {counts(self.refused)}; "
            f"closed idle {counts(self.closed_idle)}; now {self.open} client connections "
            f"(max_connections {self.limits.total}, max_connections_per_source "
            f"{self.limits.per_source}), most from {self.busiest[0] or '-'} ({self.busiest[1]})"
        )


class Budget(Generic[C]):
    """The connections held, oldest first, their sources, and counts of what was refused or
    closed. Connections are opaque hashable keys; ``idle_since(conn)`` says when one last
    became idle (0 while it is busy), read only when a victim is needed, so a request costs the
    budget nothing."""

    def __init__(
        self,
        limits: Limits,
        idle_since: Callable[[C], float],
        warn_every: float = WARN_EVERY,
    ) -> None:
        self.limits = limits
        self.idle_since = idle_since
        self.warn_every = warn_every
        self.refused = dict.fromkeys(REASONS, 0)  # since start, by limit
        self.closed_idle = dict.fromkeys(REASONS, 0)
        self._source: dict[C, str] = {}  # every connection held, oldest first
        self._by_source: dict[str, dict[C, None]] = {}  # the same per source, oldest first
        self._refused_since = dict.fromkeys(REASONS, 0)  # since the last warning
        self._closed_since = dict.fromkeys(REASONS, 0)
        self._warned_at: float | None = None

    @property
    def open(self) -> int:
        return len(self._source)

    @property
    def idle_count(self) -> int:
        idle_since = self.idle_since
        return sum(1 for conn in self._source if idle_since(conn) > 0.0)

    def held_by(self, source: str) -> int:
        held = self._by_source.get(source)
        return len(held) if held is not None else 0

    def admit(self, conn: C, source: str) -> Admission:
        """Take a new connection from ``source``, closing the oldest idle connection when a
        limit is reached, or refuse it when none of the oldest SCAN is idle."""
        pool: Mapping[C, object] | None
        held = self._by_source.get(source)
        if held is not None and len(held) >= self.limits.per_source:
            reason, pool = PER_SOURCE, held
        elif len(self._source) >= self.limits.total:
            reason, pool = TOTAL, self._source
        else:
            self._hold(conn, source)
            return Admission(True)
        victim = self._oldest_idle(pool)
        if victim is None:
            self.refused[reason] += 1
            self._refused_since[reason] += 1
            return Admission(False, reason)
        self.release(victim)
        self.closed_idle[reason] += 1
        self._closed_since[reason] += 1
        self._hold(conn, source)
        return Admission(True, reason, (victim,))

    def _oldest_idle(self, pool: Mapping[C, object]) -> C | None:
        """The oldest idle connection among the oldest SCAN of ``pool`` (bounded work per
        admission: a pool whose oldest are all busy refuses rather than searches)."""
        idle_since = self.idle_since
        for n, conn in enumerate(pool):
            if idle_since(conn) > 0.0:
                return conn
            if n >= SCAN:
                break
        return None

    def release(self, conn: C) -> None:
        """The connection closed (whoever closed it). Unknown connections are ignored: those
        refused, and those already given up to make room."""
        source = self._source.pop(conn, None)
        if source is None:
            return
        held = self._by_source[source]
        del held[conn]
        if not held:
            del self._by_source[source]

    def pressure(self, now: float) -> Pressure | None:
        """What to warn about, when a limit was reached since the last warning and that was at
        least ``warn_every`` ago (the first time: at once)."""
        if not any(self._refused_since.values()) and not any(self._closed_since.values()):
            return None
        if self._warned_at is not None and now - self._warned_at < self.warn_every:
            return None
        self._warned_at = now
        report = Pressure(
            tuple(self._refused_since.items()),
            tuple(self._closed_since.items()),
            self.open,
            self.limits,
            max(
                ((src, len(held)) for src, held in self._by_source.items()),
                key=lambda item: item[1],
                default=("", 0),
            ),
        )
        self._refused_since = dict.fromkeys(REASONS, 0)
        self._closed_since = dict.fromkeys(REASONS, 0)
        return report

    def warn_at(self) -> float | None:
        """When the next warning is due (None: nothing to warn about), so that counts left after
        the last one are still told when the flood stops."""
        if not any(self._refused_since.values()) and not any(self._closed_since.values()):
            return None
        return 0.0 if self._warned_at is None else self._warned_at + self.warn_every

    def _hold(self, conn: C, source: str) -> None:
        self._source[conn] = source
        held = self._by_source.get(source)
        if held is None:
            held = self._by_source[source] = {}
        held[conn] = None


# -- the asyncio shell ----------------------------------------------------------------------------


class Held(Protocol):
    """A client connection as the gate sees it: a protocol with its transport (None once lost)
    and when it last became idle (0.0 while a request is in flight, or before the first)."""

    transport: asyncio.Transport | None
    idle_since: float

    def __hash__(self) -> int: ...


class Gate:
    """The budget as the listeners use it: ``accept`` in ``connection_made`` (False: the
    connection was refused and is already closed, do nothing more) and ``release`` in
    ``connection_lost``; in between, a connection keeps its own ``idle_since``."""

    def __init__(self, budget: Budget[Held]) -> None:
        self.budget = budget
        self.release = budget.release
        self._timer: asyncio.TimerHandle | None = None

    @classmethod
    def for_config(cls, max_connections: int, max_per_source: int) -> Gate:
        """A gate with limits as configured, defaults from the descriptor limit now."""
        limits = Limits.derive(max_connections, max_per_source, descriptor_limit())
        logger.info(
            "proxy connection budget: %d client connections, %d per source address "
            "(descriptor limit %d)",
            limits.total,
            limits.per_source,
            limits.nofile,
        )
        if limits.total > limits.derived:
            logger.warning(
                "proxy.max_connections: %d is more than the descriptor limit %d leaves for client "
                "connections (%d): a flood can exhaust descriptors; lower it or raise the limit "
                "(LimitNOFILE=, ulimit -n, docker run --ulimit nofile=)",
                limits.total,
                limits.nofile,
                limits.derived,
            )
        return cls(Budget(limits, _idle_since))

    def accept(self, conn: Held, transport: asyncio.Transport, now: float) -> bool:
        """Admit a connection just accepted, closing an idle one to make room, or refuse it
        (reset at once: no descriptor is held for it)."""
        peer = transport.get_extra_info("peername")
        verdict = self.budget.admit(conn, source_of(str(peer[0])) if peer else "")
        for victim in verdict.victims:
            if victim.transport is not None:
                victim.transport.close()  # idle: nothing in flight, nothing lost
        if not verdict.admitted:
            transport.abort()
        if verdict.reason:
            self._warn(now)
        return verdict.admitted

    def _warn(self, now: float) -> None:
        """Log what the budget has to warn about now; if more is left for later, come back when
        it is due (one timer at a time)."""
        report = self.budget.pressure(now)
        if report is not None:
            logger.warning("%s", report.message())
        due = self.budget.warn_at()
        if due is not None and self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(due, self._due, loop)

    def _due(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        self._warn(loop.time())


def _idle_since(conn: Held) -> float:
    return conn.idle_since
