"""Translate Docker's JSON (container inspect, events) into registry vocabulary. Pure functions,
tested on JSON fixtures; no I/O, no docker SDK."""

from __future__ import annotations

import enum
import re
import signal as signal_module
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from stablenet.config import DockerConfig, HealthConfig
from stablenet.model import Endpoint, HealthSpec
from stablenet.units import parse_duration, parse_hostport, parse_port
from stablenet.vips.labels import label_problem

LABEL = "stablenet."
COMPOSE_SERVICE = "com.docker.compose.service"
KNOWN_LABELS = frozenset(
    LABEL + name
    for name in (
        "enable",
        "service",
        "port",
        "network",
        "http.host",
        "weight",
        "health.path",
        "health.interval",
        "health.timeout",
        "health.rise",
        "health.fall",
        "health.status",
        "health.host",
        "health.panic",
        "proxy.listen",
        "replicas",
        "heal",
        "managed",
        "replicas.min",
        "replicas.max",
        "scale.target",
        "scale.window",
        "scale.down_window",
        "scale.idle",
        "vip.mode",
        "vip.ports",
    )
)
_SERVICE_NAME = re.compile(r"^[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?$")
_HOST_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_HOST_NAME = re.compile(r"^(\*\.)?[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")
# Signals after which a container is expected to exit; others (HUP, USR1, ...) are not a stop.
STOP_SIGNALS = frozenset(
    {"2", "3", "9", "15", "SIGINT", "SIGQUIT", "SIGKILL", "SIGTERM", "INT", "QUIT", "KILL", "TERM"}
)


class LabelError(ValueError):
    """A container's stablenet.* label has a value that cannot be used. One readable line."""


@dataclass(frozen=True, slots=True)
class Settings:
    """What translation needs from the configuration."""

    network: str = ""
    exposed_by_default: bool = True
    health: HealthConfig = HealthConfig()

    @classmethod
    def from_config(cls, docker: DockerConfig, health: HealthConfig) -> Settings:
        return cls(docker.network, docker.exposed_by_default, health)


def container_name(inspect: Mapping[str, Any]) -> str:
    return str(inspect.get("Name") or inspect.get("Id", "")[:12]).lstrip("/")


def endpoint_from_inspect(inspect: Mapping[str, Any], settings: Settings) -> Endpoint | None:
    """The endpoint a running container provides, or None when it provides none (stopped,
    paused, opted out, no address). Raises LabelError for unusable label values."""
    state = inspect.get("State") or {}
    if not state.get("Running") or state.get("Paused") or state.get("Restarting"):
        return None
    config = inspect.get("Config") or {}
    labels: dict[str, str] = dict(config.get("Labels") or {})
    name = container_name(inspect)

    def bad(label: str, problem: str) -> LabelError:
        return LabelError(
            f"container {name}: label {label}={labels[label]!r} is not valid: {problem}"
        )

    enable = labels.get(LABEL + "enable")
    if enable is not None:
        flag = enable.strip().lower()
        if flag not in ("true", "false", "1", "0", "yes", "no"):
            raise bad(LABEL + "enable", "expected true or false")
        if flag in ("false", "0", "no"):
            return None
    elif not settings.exposed_by_default:
        return None

    service = service_of(labels, name)

    network, address, address6, addresses = _choose_address(inspect, labels, name, settings)
    if address is None:
        return None

    port: int | None
    if LABEL + "port" in labels:
        try:
            port = parse_port(labels[LABEL + "port"].strip())
        except ValueError as exc:
            raise bad(LABEL + "port", str(exc)) from None
    else:
        port = _lowest_exposed_port(config.get("ExposedPorts") or {})

    weight = 1
    if LABEL + "weight" in labels:
        try:
            weight = int(labels[LABEL + "weight"])
        except ValueError:
            weight = -1
        if not 0 <= weight <= 1000:
            raise bad(LABEL + "weight", "expected a whole number from 0 to 1000")

    hosts: tuple[str, ...] = ()
    if LABEL + "http.host" in labels:
        hosts = tuple(
            h.strip().lower().rstrip(".")
            for h in labels[LABEL + "http.host"].split(",")
            if h.strip()
        )
        for host in hosts:
            problem = _http_host_problem(host)
            if problem is not None:
                raise bad(LABEL + "http.host", problem)

    listeners: tuple[str, ...] = ()
    if LABEL + "proxy.listen" in labels:
        entries = [e.strip() for e in labels[LABEL + "proxy.listen"].split(",") if e.strip()]
        for entry in entries:
            kind, _, hostport = entry.partition(":")
            try:
                if kind not in ("http", "tcp"):
                    raise ValueError("expected http:HOST:PORT or tcp:HOST:PORT")
                parse_hostport(hostport)
            except ValueError as exc:
                raise bad(LABEL + "proxy.listen", f"{entry!r}: {exc}") from None
        listeners = tuple(entries)

    vip_problem = label_problem(labels)
    if vip_problem is not None:
        raise bad(*vip_problem)

    check = _health_spec(labels, settings.health, bad)
    if check is not None and port is None:
        raise LabelError(
            f"container {name}: a health check is configured but no port is known; "
            f"set label {LABEL}port"
        )
    panic = settings.health.panic
    if LABEL + "health.panic" in labels:
        flag = labels[LABEL + "health.panic"].strip().lower()
        if flag not in ("true", "false"):
            raise bad(LABEL + "health.panic", "expected true or false")
        panic = flag == "true"
    health = (state.get("Health") or {}).get("Status")
    return Endpoint(
        id=str(inspect["Id"]),
        name=name,
        service=service,
        address=address,
        port=port,
        network=network,
        addresses=addresses,
        address6=address6,
        labels=labels,
        started_at=_parse_time(state.get("StartedAt")),
        weight=weight,
        http_hosts=hosts,
        check=check,
        docker_health=str(health) if health in ("starting", "healthy", "unhealthy") else None,
        panic=panic,
        stop_signal=str(config.get("StopSignal") or ""),
        stop_timeout=_stop_timeout(config.get("StopTimeout")),
        listeners=listeners,
        host_port=_published_port(inspect, port),
        exposed=tuple(sorted(str(spec) for spec in config.get("ExposedPorts") or {})),
    )


def service_of(labels: Mapping[str, str], name: str) -> str:
    """The service a container belongs to: label stablenet.service, else the Compose service,
    else the container name (made a DNS label). Raises LabelError for a bad stablenet.service."""
    service = (labels.get(LABEL + "service") or labels.get(COMPOSE_SERVICE) or name).strip().lower()
    if _SERVICE_NAME.match(service):
        return service
    if LABEL + "service" in labels:
        raise LabelError(
            f"container {name}: label {LABEL}service={labels[LABEL + 'service']!r} is not valid: "
            "expected a DNS label: letters, digits, '-' or '_', at most 63"
        )
    return _sanitize(service)


def front_names(labels: Mapping[str, str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The usable names of label stablenet.http.host and entries of stablenet.proxy.listen
    (unusable ones left out), for a service that is fronted with no container running."""
    hosts = tuple(
        h.strip().lower().rstrip(".")
        for h in labels.get(LABEL + "http.host", "").split(",")
        if h.strip() and _http_host_problem(h.strip().lower().rstrip(".")) is None
    )
    listeners = []
    for entry in (e.strip() for e in labels.get(LABEL + "proxy.listen", "").split(",")):
        kind, _, hostport = entry.partition(":")
        try:
            parse_hostport(hostport)
        except ValueError:
            continue
        if kind in ("http", "tcp"):
            listeners.append(entry)
    return hosts, tuple(listeners)


def _http_host_problem(host: str) -> str | None:
    """Why a name of the stablenet.http.host label cannot route, or None. A name is a DNS name,
    or ``*.`` before one: ``*.example.com`` stands for one or more leading labels."""
    name = host.removeprefix("*.")
    if "*" in name:
        if host == "*":
            return "'*' alone is not a wildcard; name a suffix, as in *.example.com"
        return f"{host!r}: '*' may only stand for the leading labels, as in *.example.com"
    if len(name) > 253 or not all(_HOST_LABEL.match(label) for label in name.split(".")):
        return f"{host!r} is not a host name"
    return None


def _stop_timeout(value: Any) -> float | None:
    """The container's own StopTimeout in seconds; None when it sets none (Docker's default)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return None
    return float(value)


def _sanitize(name: str) -> str:
    cleaned = re.sub(r"[^a-z0-9_-]", "-", name)[:63].strip("-_")
    return cleaned or "container"


def _choose_address(
    inspect: Mapping[str, Any], labels: Mapping[str, str], name: str, settings: Settings
) -> tuple[str, str | None, str | None, tuple[str, ...]]:
    """(network, IPv4-or-IPv6 address, IPv6 address, all addresses): label stablenet.network,
    else the configured network, else the first network by sorted name that has an address."""
    networks: Mapping[str, Any] = (inspect.get("NetworkSettings") or {}).get("Networks") or {}
    usable: dict[str, tuple[str | None, str | None]] = {}
    for net_name in sorted(networks):
        info = networks[net_name] or {}
        v4 = info.get("IPAddress") or None
        v6 = info.get("GlobalIPv6Address") or None
        if v4 or v6:
            usable[net_name] = (v4, v6)
    all_addresses = tuple(a for v4, v6 in usable.values() for a in (v4, v6) if a)
    mode = str((inspect.get("HostConfig") or {}).get("NetworkMode") or "")
    wanted = labels.get(LABEL + "network")
    if wanted is not None:
        wanted = wanted.strip()
        if wanted not in usable:
            on = ", ".join(usable) or "no network with an address"
            raise LabelError(
                f"container {name}: label {LABEL}network={wanted!r} is not valid: the container "
                f"is not on that network (it is on: {on})"
            )
        chosen = wanted
    elif settings.network and settings.network in usable:
        chosen = settings.network
    elif usable:
        chosen = next(iter(usable))
    elif mode == "host":
        return "host", "127.0.0.1", None, ("127.0.0.1",)
    else:
        return "", None, None, ()
    v4, v6 = usable[chosen]
    return chosen, v4 or v6, v6, all_addresses


def _published_port(inspect: Mapping[str, Any], port: int | None) -> int | None:
    """The host port Docker publishes ``port`` (TCP) on for every address of the host, or
    None (not published, or only on one address such as 127.0.0.1)."""
    if port is None:
        return None
    ports = (inspect.get("NetworkSettings") or {}).get("Ports") or {}
    for binding in ports.get(f"{port}/tcp") or ():
        host_ip = str(binding.get("HostIp") or "")
        host_port = str(binding.get("HostPort") or "")
        if host_ip in ("", "0.0.0.0", "::") and host_port.isdigit():
            return int(host_port)
    return None


def _lowest_exposed_port(exposed: Mapping[str, Any]) -> int | None:
    ports = []
    for spec in exposed:
        number, _, proto = str(spec).partition("/")
        if proto in ("", "tcp") and number.isascii() and number.isdigit():
            ports.append(int(number))
    return min(ports) if ports else None


def _health_spec(labels: Mapping[str, str], defaults: HealthConfig, bad: Any) -> HealthSpec | None:
    keys = [k for k in labels if k.startswith(LABEL + "health.") and k != LABEL + "health.panic"]
    if not keys:
        return None
    for key in keys:
        if key not in KNOWN_LABELS:
            raise bad(
                key,
                "unknown health label; use path, interval, timeout, rise, fall, status, "
                "host or panic",
            )
    path = labels.get(LABEL + "health.path")
    if path is not None and (
        not path.startswith("/") or not path.isascii() or not path.isprintable() or " " in path
    ):
        raise bad(LABEL + "health.path", "expected a path starting with / (ASCII, no spaces)")
    values: dict[str, Any] = {}
    for key, default in (("interval", defaults.interval), ("timeout", defaults.timeout)):
        label = f"{LABEL}health.{key}"
        if label in labels:
            try:
                values[key] = parse_duration(labels[label])
            except ValueError as exc:
                raise bad(label, str(exc)) from None
            if values[key] <= 0:
                raise bad(label, "expected a duration above zero")
        else:
            values[key] = default
    for key, default_count in (("rise", defaults.rise), ("fall", defaults.fall)):
        label = f"{LABEL}health.{key}"
        if label in labels:
            text = labels[label].strip()
            if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 100:
                raise bad(label, "expected a whole number from 1 to 100")
            values[key] = int(text)
        else:
            values[key] = default_count
    if values["timeout"] > values["interval"]:
        values["timeout"] = values["interval"]
    status = labels.get(LABEL + "health.status")
    if status is not None:
        low, _, high = status.strip().partition("-")
        high = high or low
        digits = (low + high).isascii() and low.isdigit() and high.isdigit()
        if not (digits and 100 <= int(low) <= int(high) <= 599):
            raise bad(LABEL + "health.status", "expected a status or range such as 200 or 200-399")
        values["status_min"], values["status_max"] = int(low), int(high)
    host = labels.get(LABEL + "health.host")
    if host is not None:
        if not _HOST_NAME.match(host.strip().lower()):
            raise bad(LABEL + "health.host", "expected a host name")
        values["host"] = host.strip()
    return HealthSpec(path=path, **values)


def _parse_time(text: Any) -> float:
    """Docker's RFC 3339 with nanoseconds ('2026-11-28T06:42:57.275724022Z') -> unix time."""
    if not isinstance(text, str) or not text or text.startswith("0001-"):
        return 0.0
    match = re.match(r"^(.*T\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$", text)
    if match is None:
        return 0.0
    frac = (match.group(2) or ".0")[:7]
    zone = "+00:00" if match.group(3) == "Z" else match.group(3)
    try:
        return datetime.fromisoformat(match.group(1) + frac + zone).timestamp()
    except ValueError:
        return 0.0


class Action(enum.Enum):
    DRAIN = "drain"
    REMOVE = "remove"
    INSPECT = "inspect"
    SIGNAL = "signal"  # another signal: a stop only if it is the container's own STOPSIGNAL


_CONTAINER_ACTIONS = {
    "stop": Action.DRAIN,
    "die": Action.REMOVE,
    "destroy": Action.REMOVE,
    "pause": Action.REMOVE,
    "start": Action.INSPECT,
    "unpause": Action.INSPECT,
    "restart": Action.INSPECT,
    "rename": Action.INSPECT,
    "health_status": Action.INSPECT,
    "update": Action.INSPECT,
}


def classify(event: Mapping[str, Any]) -> tuple[Action, str] | None:
    """What an event means for the registry: (action, container id), or None to ignore it."""
    kind = event.get("Type")
    action = str(event.get("Action") or event.get("status") or "")
    actor = event.get("Actor") or {}
    attrs = actor.get("Attributes") or {}
    if kind == "container":
        cid = str(actor.get("ID") or event.get("id") or "")
        verb = action.split(":", 1)[0].strip()
        if not cid:
            return None
        if verb == "kill":
            signal = str(attrs.get("signal", "")).upper()
            return (Action.DRAIN if signal in STOP_SIGNALS or not signal else Action.SIGNAL, cid)
        what = _CONTAINER_ACTIONS.get(verb)
        return (what, cid) if what is not None else None
    if kind == "network" and action in ("connect", "disconnect"):
        cid = str(attrs.get("container") or "")
        return (Action.INSPECT, cid) if cid else None
    return None


def signal_number(text: str) -> int | None:
    """'SIGWINCH', 'WINCH' or '28' -> 28; None when it names no signal."""
    text = text.strip().upper()
    if text.isascii() and text.isdigit():
        return int(text)
    name = text if text.startswith("SIG") else "SIG" + text
    try:
        return int(signal_module.Signals[name])
    except KeyError:
        return None


def event_signal(event: Mapping[str, Any]) -> str:
    """The signal a kill event names ("15", "SIGWINCH"), or ""."""
    attrs = (event.get("Actor") or {}).get("Attributes") or {}
    return str(attrs.get("signal", ""))


def stops(signal: str, stop_signal: str) -> bool:
    """Whether a kill with ``signal`` is the container's own STOPSIGNAL (docker stop sends it)."""
    sent = signal_number(signal)
    return bool(stop_signal) and sent is not None and sent == signal_number(stop_signal)


def event_time(event: Mapping[str, Any]) -> float:
    """The event's own timestamp as unix time (Docker's timeNano when present)."""
    nano = event.get("timeNano")
    if isinstance(nano, int):
        return nano / 1e9
    return float(event.get("time") or 0)
