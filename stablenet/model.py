"""The shared vocabulary: endpoints, their state, and the changes sources send to the registry.
Frozen, slotted dataclasses only; nothing here does I/O or knows Docker."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field


class State(enum.Enum):
    """Where an endpoint stands for routing. Only READY endpoints get traffic."""

    STARTING = "starting"  # running, waiting for its first passing health check
    READY = "ready"
    UNHEALTHY = "unhealthy"  # failed its checks (or Docker says unhealthy)
    DRAINING = "draining"  # being stopped: no new traffic, in-flight requests finish


@dataclass(frozen=True, slots=True)
class HealthSpec:
    """An active check stablenet runs against an endpoint. path None means a TCP connect."""

    path: str | None
    interval: float
    timeout: float
    rise: int
    fall: int
    status_min: int = 200  # HTTP status range that passes
    status_max: int = 399
    host: str | None = None  # HTTP Host header; None: the endpoint's address


@dataclass(frozen=True, slots=True)
class Verdict:
    """The latest result of stablenet's own check for one endpoint."""

    passing: bool
    reason: str
    at: float  # unix time of the check


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a remote endpoint runs: the host that publishes it (through the cluster store) and
    its state there. ``address``/``port`` of the endpoint are what this host reaches;
    ``target_port`` is the container's own port."""

    host: str
    state: State
    reason: str
    target_port: int | None = None


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One running container as a member of one service.

    The source sets the facts (addresses, labels, draining, Docker's health status); the health
    checker sets ``verdict``. ``state`` is derived from both, so nobody can set it inconsistently.
    """

    id: str  # full container id
    name: str  # container name, without Docker's leading slash
    service: str
    address: str  # IPv4 (or IPv6 when the network has no IPv4) on the chosen network
    port: int | None
    network: str
    addresses: tuple[str, ...] = ()  # every address the container holds, all networks
    address6: str | None = None  # IPv6 on the chosen network, when it has one
    labels: Mapping[str, str] = field(default_factory=dict)
    started_at: float = 0.0  # unix time
    weight: int = 1
    http_hosts: tuple[str, ...] = ()
    check: HealthSpec | None = None
    docker_health: str | None = None  # Docker HEALTHCHECK status: starting, healthy, unhealthy
    draining: bool = False
    verdict: Verdict | None = None
    panic: bool = False  # route to every running endpoint when none of the service is ready
    stop_signal: str = ""  # the image's STOPSIGNAL when it is not SIGTERM (e.g. SIGWINCH)
    stop_timeout: float | None = None  # the container's StopTimeout; None: Docker's default
    listeners: tuple[str, ...] = ()  # dedicated proxy listeners, "http:HOST:PORT" / "tcp:..."
    host_port: int | None = None  # the port this host publishes ``port`` on (all addresses)
    origin: Origin | None = None  # None: a container of this host; else the host it runs on
    exposed: tuple[str, ...] = ()  # the container's exposed ports, "80/tcp", "53/udp", sorted

    @property
    def host(self) -> str:
        """The host the container runs on; "" for this host."""
        return "" if self.origin is None else self.origin.host

    @property
    def state(self) -> State:
        return self._status()[0]

    @property
    def reason(self) -> str:
        """Why the endpoint is in its state, in a few words."""
        return self._status()[1]

    def _status(self) -> tuple[State, str]:
        """The state, from draining, Docker's health and the check's verdict, with why. A remote
        endpoint's own host decides first; this host's passive ejection (verdict) comes next."""
        origin = self.origin
        if origin is not None and origin.state is not State.READY:
            return origin.state, f"on {origin.host}: {origin.reason}"
        if self.draining:
            return State.DRAINING, "container is stopping"
        if self.docker_health == "unhealthy":
            return State.UNHEALTHY, "Docker HEALTHCHECK says unhealthy"
        if self.verdict is not None and not self.verdict.passing:
            return State.UNHEALTHY, self.verdict.reason
        if self.docker_health == "starting":
            return State.STARTING, "Docker HEALTHCHECK is starting"
        if self.check is not None and self.verdict is None:
            return State.STARTING, "waiting for the first health check"
        if self.verdict is not None:
            return State.READY, self.verdict.reason
        if self.docker_health == "healthy":
            return State.READY, "Docker HEALTHCHECK says healthy"
        if origin is not None:
            return State.READY, f"on {origin.host}: {origin.reason}"
        return State.READY, "running"


@dataclass(frozen=True, slots=True)
class Upsert:
    """Add an endpoint or replace the facts of the one with the same container id."""

    endpoint: Endpoint


@dataclass(frozen=True, slots=True)
class Remove:
    """The container no longer holds its addresses (died, paused, destroyed, left the network).
    ``at``: the event's time; an endpoint started after it is a newer incarnation (already
    inspected after a restart) and is kept."""

    id: str
    at: float | None = None


@dataclass(frozen=True, slots=True)
class Drain:
    """The container is being stopped: no new traffic. ``at`` as for Remove."""

    id: str
    at: float | None = None


@dataclass(frozen=True, slots=True)
class Undrain:
    """The container outlived its stop signal and its stop timeout: route to it again. Applies
    only to the incarnation that started at ``started_at``."""

    id: str
    started_at: float


@dataclass(frozen=True, slots=True)
class Resync:
    """The full truth from a complete listing. Endpoints not listed are removed, except ids in
    ``keep``, whose current entry is fresher than the listing (an event touched them while the
    listing ran). ``problems`` maps container ids to why they were skipped."""

    endpoints: tuple[Endpoint, ...]
    keep: frozenset[str] = frozenset()
    problems: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Problem:
    """A container that cannot be registered (bad label) and why; None clears it."""

    id: str
    message: str | None


@dataclass(frozen=True, slots=True)
class SetVerdict:
    """A health check result for an endpoint, ignored if the endpoint is gone or moved address."""

    id: str
    address: str
    verdict: Verdict


@dataclass(frozen=True, slots=True)
class SetRemote:
    """Every endpoint other hosts publish, as this host currently sees them (each with an
    ``origin``): replaces the remote layer whole. Local changes (Resync included) never touch
    that layer, and this never touches local endpoints."""

    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True, slots=True)
class Front:
    """A service the proxy fronts whether or not it has endpoints (an autoscaled one, perhaps
    scaled to zero): its names stay routed and its listeners open, requests for it are held
    until a replica is ready, and DNS answers its name with the proxy's address."""

    http_hosts: tuple[str, ...] = ()
    listeners: tuple[str, ...] = ()  # as Endpoint.listeners
    parked: bool = False  # scaled to zero: every replica stopped


@dataclass(frozen=True, slots=True)
class SetFront:
    """Front a service (``front``), or stop fronting it (None)."""

    service: str
    front: Front | None


@dataclass(frozen=True, slots=True)
class SetSynced:
    """Whether the registry reflects a live connection to its source."""

    synced: bool


Change = (
    Upsert
    | Remove
    | Drain
    | Undrain
    | Resync
    | Problem
    | SetVerdict
    | SetSynced
    | SetRemote
    | SetFront
)
