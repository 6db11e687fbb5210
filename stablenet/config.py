"""Configuration: parse and validate the TOML file and STABLENET_<SECTION>_<KEY> overrides into
frozen dataclasses, once. Errors are ConfigError with one line naming the key, the value and what
is accepted. Nothing here prints or exits; the CLI does that."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stablenet.units import (
    is_loopback,
    parse_duration,
    parse_hostport,
    parse_network,
    parse_port,
)

ENV_PREFIX = "STABLENET_"
# Environment variables of ours that are not config keys: the config file, the uncompiled switch.
NOT_SETTINGS = frozenset({"STABLENET_CONFIG", "STABLENET_PURE"})
DEFAULT_PATHS = (Path("config/stablenet.toml"), Path("/etc/stablenet/stablenet.toml"))


class ConfigError(Exception):
    """A configuration value is missing, unknown or invalid. str() is one readable line."""


Parser = Callable[[Any], Any]


def _opt(default: Any, parse: Parser) -> Any:
    return field(default=default, metadata={"parse": parse})


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _int_at_least(minimum: int, maximum: int | None = None) -> Parser:
    expected = f"expected a whole number >= {minimum}"
    if maximum is not None:
        expected = f"expected a whole number from {minimum} to {maximum}"

    def parse(value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError(expected)
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise ValueError(expected) from None
        if number < minimum or (maximum is not None and number > maximum):
            raise ValueError(expected)
        return number

    return parse


def _count_or_auto(value: Any) -> int:
    """A whole number >= 1, or 0 / "auto" (returned as 0) for a default the code derives."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return 0
    try:
        return int(_int_at_least(0)(value))
    except ValueError:
        raise ValueError('expected a whole number >= 1, or "auto" (or 0) for the default') from None


def _positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("expected a duration above zero such as 500ms, 2s, 1m")
    return seconds


def _positive_number(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError("expected a number above 0") from None
    if not number > 0 or number == float("inf"):
        raise ValueError("expected a number above 0")
    return number


def _history(value: Any) -> float:
    """Traffic history: whole seconds (one sample a second per service), up to an hour."""
    seconds = parse_duration(value)
    if not 1 <= seconds <= 3600:
        raise ValueError("expected a duration from 1s to 1h such as 10m")
    return seconds


def _choice(*choices: str) -> Parser:
    def parse(value: Any) -> str:
        if value not in choices:
            raise ValueError("expected one of " + ", ".join(choices))
        return str(value)

    return parse


def _list_of(item: Parser) -> Parser:
    """A TOML array, or a comma-separated string (the form environment variables use)."""

    def parse(value: Any) -> tuple[Any, ...]:
        if isinstance(value, str):
            parts = [part.strip() for part in value.split(",") if part.strip()]
        elif isinstance(value, list | tuple):
            parts = list(value)
        else:
            raise ValueError("expected a list (or a comma-separated string)")
        out = []
        for part in parts:
            try:
                out.append(item(part))
            except ValueError as exc:
                raise ValueError(f"item {part!r}: {exc}") from None
        return tuple(out)

    return parse


def _hostport_text(value: Any) -> str:
    parse_hostport(value)
    return str(value)


def _dns_listen_entry(value: Any) -> str:
    """HOST:PORT, or docker:PORT for the engine's default bridge gateway (containers reach it)."""
    text = _str(value)
    host, sep, port = text.rpartition(":")
    if sep and host == "docker":
        parse_port(port)
        return text
    parse_hostport(text)
    return text


def _allow_entry(value: Any) -> str:
    if value == "docker":
        return "docker"
    parse_network(_str(value))
    return str(value)


def _zone(value: Any) -> str:
    zone = _str(value).strip().strip(".").lower()
    labels = zone.split(".")
    if not zone or any(not label or len(label) > 63 for label in labels):
        raise ValueError("expected a DNS name such as stablenet.internal")
    return zone


def _upstream(value: Any) -> str:
    text = _str(value)
    try:
        parse_network(text)  # a bare address
        return text
    except ValueError:
        parse_hostport(text)
        return text


_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def _cookie_name(value: Any) -> str:
    text = _str(value).strip()
    if text and not _TOKEN.match(text):
        raise ValueError("expected a cookie name (letters, digits, - and _) or empty for off")
    return text


def _proxy_listener(value: Any) -> str:
    """'SERVICE=http:HOST:PORT' or 'SERVICE=tcp:HOST:PORT': a listener for one service."""
    text = _str(value).strip()
    service, sep, rest = text.partition("=")
    kind, _, hostport = rest.partition(":")
    if not sep or not service or kind not in ("http", "tcp"):
        raise ValueError("expected SERVICE=http:HOST:PORT or SERVICE=tcp:HOST:PORT")
    parse_hostport(hostport)
    return text


@dataclass(frozen=True, slots=True)
class DnsConfig:
    enabled: bool = _opt(True, _bool)
    listen: tuple[str, ...] = _opt(("127.0.0.1:53",), _list_of(_dns_listen_entry))
    zone: str = _opt("stablenet.internal", _zone)
    upstreams: tuple[str, ...] = _opt((), _list_of(_upstream))
    allow: tuple[str, ...] = _opt(("127.0.0.0/8", "::1/128", "docker"), _list_of(_allow_entry))
    ttl: float = _opt(5.0, parse_duration)
    negative_ttl: float = _opt(5.0, parse_duration)
    cache_size: int = _opt(10000, _int_at_least(1))
    forward_timeout: float = _opt(2.0, _positive_duration)
    max_forwards: int = _opt(256, _int_at_least(1))
    tcp_connections: int = _opt(256, _int_at_least(1))
    tcp_per_client: int = _opt(32, _int_at_least(1))


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    enabled: bool = _opt(True, _bool)
    listen: str = _opt("169.254.100.1:80", _hostport_text)
    hold_timeout: float = _opt(10.0, parse_duration)
    balance: str = _opt("p2c", _choice("p2c", "round_robin", "least_requests"))
    header_timeout: float = _opt(10.0, _positive_duration)
    idle_timeout: float = _opt(60.0, _positive_duration)
    connect_timeout: float = _opt(2.0, _positive_duration)
    response_timeout: float = _opt(60.0, _positive_duration)
    max_header_size: int = _opt(32768, _int_at_least(1024))
    upstream_keepalive: int = _opt(128, _int_at_least(0))
    access_log: bool = _opt(False, _bool)
    sticky_cookie: str = _opt("", _cookie_name)
    listeners: tuple[str, ...] = _opt((), _list_of(_proxy_listener))
    retries: int = _opt(2, _int_at_least(0))
    retry_budget: int = _opt(20, _int_at_least(0))
    send_timeout: float = _opt(30.0, _positive_duration)
    reuse_idle_non_idempotent: float = _opt(1.0, parse_duration)
    max_connections: int = _opt(0, _count_or_auto)  # 0: from the descriptor limit
    max_connections_per_source: int = _opt(0, _count_or_auto)  # 0: a quarter of the above
    workers: int = _opt(1, _count_or_auto)  # proxy processes; 0: one per CPU (workers.py)


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: str = _opt("127.0.0.1:9180", _hostport_text)
    token: str = _opt("", _str)
    metrics: bool = _opt(True, _bool)
    history: float = _opt(600.0, _history)  # per-second traffic kept for the status page


@dataclass(frozen=True, slots=True)
class DockerConfig:
    network: str = _opt("", _str)
    resync_interval: float = _opt(30.0, _positive_duration)
    exposed_by_default: bool = _opt(True, _bool)


@dataclass(frozen=True, slots=True)
class HealthConfig:
    interval: float = _opt(2.0, _positive_duration)
    timeout: float = _opt(1.0, _positive_duration)
    rise: int = _opt(1, _int_at_least(1))
    fall: int = _opt(3, _int_at_least(1))
    eject_after: int = _opt(5, _int_at_least(0))
    eject_time: float = _opt(5.0, _positive_duration)
    eject_max: float = _opt(300.0, _positive_duration)
    max_ejection_percent: int = _opt(50, _int_at_least(1, 100))
    panic: bool = _opt(False, _bool)


def _state_dir(value: Any) -> str:
    text = _str(value).strip()
    if not text or not text.startswith("/"):
        raise ValueError("expected an absolute directory path such as /var/lib/stablenet")
    return text


@dataclass(frozen=True, slots=True)
class ControllerConfig:
    enabled: bool = _opt(True, _bool)
    state_dir: str = _opt("/var/lib/stablenet", _state_dir)
    heal: str = _opt("replace", _choice("replace", "restart"))
    unhealthy_grace: float = _opt(10.0, parse_duration)
    ready_timeout: float = _opt(120.0, _positive_duration)
    drain_timeout: float = _opt(30.0, parse_duration)
    backoff: float = _opt(10.0, _positive_duration)
    backoff_max: float = _opt(300.0, _positive_duration)
    backoff_reset: float = _opt(600.0, _positive_duration)
    breaker: int = _opt(3, _int_at_least(1))
    replicas_min: int = _opt(1, _int_at_least(0, 1000))
    replicas_max: int = _opt(10, _int_at_least(1, 1000))
    scale_target: float = _opt(10.0, _positive_number)
    scale_window: float = _opt(60.0, _positive_duration)
    scale_down_window: float = _opt(300.0, _positive_duration)
    scale_idle: float = _opt(0.0, parse_duration)  # 0: as long as scale_down_window


def _etcd_url(value: Any) -> str:
    text = _str(value).strip().rstrip("/")
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in ("http", "https"):
        raise ValueError("expected http://HOST:PORT or https://HOST:PORT")
    parse_hostport(rest)
    return text


def _key_prefix(value: Any) -> str:
    text = _str(value).strip().rstrip("/")
    if not text.startswith("/") or "//" in text or len(text) < 2:
        raise ValueError("expected a key path such as /stablenet")
    return text


def _host_name(value: Any) -> str:
    text = _str(value).strip()
    if text and not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$", text):
        raise ValueError("expected letters, digits, '.', '-' or '_' (at most 63), or empty")
    return text


def _host_address(value: Any) -> str:
    text = _str(value).strip()
    if text:
        parse_network(text)
        if "/" in text:
            raise ValueError("expected one IP address such as 10.0.0.5")
    return text


def _lease_ttl(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds < 2 or seconds != int(seconds):
        raise ValueError("expected whole seconds, at least 2s (etcd leases count in seconds)")
    return seconds


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    etcd: tuple[str, ...] = _opt((), _list_of(_etcd_url))  # empty: one host, no cluster
    prefix: str = _opt("/stablenet", _key_prefix)
    host_name: str = _opt("", _host_name)  # empty: the machine's host name
    host_address: str = _opt("", _host_address)
    lease_ttl: float = _opt(10.0, _lease_ttl)
    prefer: str = _opt("local-first", _choice("local-first", "spread"))
    advertise: str = _opt("published", _choice("published", "container"))
    skydns: bool = _opt(True, _bool)
    skydns_prefix: str = _opt("/skydns", _key_prefix)
    timeout: float = _opt(2.0, _positive_duration)
    ca_file: str = _opt("", _str)
    cert_file: str = _opt("", _str)
    key_file: str = _opt("", _str)
    username: str = _opt("", _str)
    password: str = _opt("", _str)


def _vip_range(value: Any) -> str:
    try:
        network = ipaddress.ip_network(_str(value).strip(), strict=True)
    except ValueError:
        raise ValueError("expected an IPv4 network such as 100.127.0.0/16") from None
    if network.version != 4 or network.prefixlen > 30:
        raise ValueError("expected an IPv4 network of at least 4 addresses, e.g. 100.127.0.0/16")
    return str(network)


@dataclass(frozen=True, slots=True)
class VipsConfig:
    enabled: bool = _opt(False, _bool)
    range: str = _opt("100.127.0.0/16", _vip_range)


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = _opt("info", _choice("debug", "info", "warning", "error"))
    format: str = _opt("text", _choice("text", "json"))


@dataclass(frozen=True, slots=True)
class Config:
    dns: DnsConfig = field(default_factory=DnsConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    docker: DockerConfig = field(default_factory=DockerConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    vips: VipsConfig = field(default_factory=VipsConfig)
    log: LogConfig = field(default_factory=LogConfig)


SECTIONS: dict[str, type[Any]] = {
    "dns": DnsConfig,
    "proxy": ProxyConfig,
    "admin": AdminConfig,
    "docker": DockerConfig,
    "health": HealthConfig,
    "controller": ControllerConfig,
    "cluster": ClusterConfig,
    "vips": VipsConfig,
    "log": LogConfig,
}


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _section(name: str, raw: Mapping[str, Any], env: Mapping[str, str]) -> Any:
    cls = SECTIONS[name]
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            raise ConfigError(
                f"{name}.{key}: unknown key; known keys in [{name}]: {', '.join(known)}"
            )
    values: dict[str, Any] = {}
    for key, fld in known.items():
        env_name = f"{ENV_PREFIX}{name.upper()}_{key.upper()}"
        where = f"{name}.{key}"
        if env_name in env:
            value: Any = env[env_name]
            where = f"{env_name} ({name}.{key})"
        elif key in raw:
            value = raw[key]
        else:
            continue
        try:
            values[key] = fld.metadata["parse"](value)
        except ValueError as exc:
            raise ConfigError(f"{where}: {_show(value)} is not valid: {exc}") from None
    return cls(**values)


def _check(config: Config) -> None:
    host, _ = parse_hostport(config.admin.listen)
    if not is_loopback(host) and not config.admin.token:
        raise ConfigError(
            f"admin.listen: {config.admin.listen!r} is not a loopback address and admin.token is "
            "empty; set admin.token (or STABLENET_ADMIN_TOKEN) to a secret, or listen on "
            "127.0.0.1"
        )
    _check_cluster(config.cluster)
    if config.health.timeout > config.health.interval:
        raise ConfigError(
            f"health.timeout: {config.health.timeout:g}s is longer than health.interval "
            f"({config.health.interval:g}s); use a timeout no longer than the interval"
        )


def _check_cluster(cluster: ClusterConfig) -> None:
    if not cluster.etcd:
        return
    if not cluster.host_address:
        raise ConfigError(
            "cluster.host_address: empty while cluster.etcd is set; set it to the address other "
            "hosts reach this host's published ports on (or STABLENET_CLUSTER_HOST_ADDRESS)"
        )
    if bool(cluster.cert_file) != bool(cluster.key_file):
        raise ConfigError(
            "cluster.cert_file: a client certificate needs both cluster.cert_file and "
            "cluster.key_file; set both or neither"
        )
    if bool(cluster.username) != bool(cluster.password):
        raise ConfigError(
            "cluster.username: etcd authentication needs both cluster.username and "
            "cluster.password; set both or neither"
        )
    schemes = {url.partition("://")[0] for url in cluster.etcd}
    if len(schemes) > 1:
        raise ConfigError(
            f"cluster.etcd: {', '.join(cluster.etcd)} mixes http:// and https://; use https:// "
            "for every endpoint when etcd serves TLS"
        )
    if (cluster.ca_file or cluster.cert_file) and schemes == {"http"}:
        raise ConfigError(
            "cluster.ca_file: TLS files are set but cluster.etcd uses http://; use https:// "
            "endpoints"
        )


def parse(text: str, env: Mapping[str, str] | None = None, source: str = "<config>") -> Config:
    """Parse TOML text plus environment overrides into a validated Config."""
    if env is None:
        env = os.environ
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    for name, body in raw.items():
        if name not in SECTIONS:
            raise ConfigError(f"[{name}]: unknown section; known sections: {', '.join(SECTIONS)}")
        if not isinstance(body, dict):
            raise ConfigError(f"{name}: expected a [{name}] table, got {_show(body)}")
    for var in env:
        if var.startswith(ENV_PREFIX) and var not in NOT_SETTINGS:
            section, _, key = var[len(ENV_PREFIX) :].lower().partition("_")
            if section not in SECTIONS or key not in {
                f.name for f in dataclasses.fields(SECTIONS[section])
            }:
                raise ConfigError(
                    f"{var}: unknown setting; use STABLENET_<SECTION>_<KEY> for a key that "
                    "exists in config/stablenet.toml"
                )
    config = Config(**{name: _section(name, raw.get(name, {}), env) for name in SECTIONS})
    _check(config)
    return config


def load(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read a config file (the given path, $STABLENET_CONFIG, or the first default that exists;
    none at all means built-in defaults) and parse it."""
    if env is None:
        env = os.environ
    if path is None and env.get("STABLENET_CONFIG"):
        path = env["STABLENET_CONFIG"]
    if path is None:
        path = next((p for p in DEFAULT_PATHS if p.is_file()), None)
        if path is None:
            return parse("", env)
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file; pass --config PATH to an existing file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    return parse(text, env, source=str(path))
