"""Parsing of the small value types shared by config and labels: durations, host:port pairs,
networks. Pure functions that raise ValueError with a message naming what is accepted."""

from __future__ import annotations

import ipaddress
import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_SCALE = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str | int | float) -> float:
    """'500ms', '2s', '1.5m', '1h' or a bare number of seconds -> seconds as a float."""
    if isinstance(text, bool):
        raise ValueError("expected a duration such as 500ms, 2s, 1m")
    if isinstance(text, int | float):
        if text < 0:
            raise ValueError("a duration cannot be negative")
        return float(text)
    match = _DURATION.match(text)
    if match is None:
        raise ValueError("expected a duration such as 500ms, 2s, 1m or 1h")
    return float(match.group(1)) * _SCALE[match.group(2)]


def parse_port(text: str | int) -> int:
    """A TCP/UDP port number 1-65535."""
    if isinstance(text, bool):
        raise ValueError("expected a port number (1-65535)")
    try:
        port = int(text)
    except (TypeError, ValueError):
        raise ValueError("expected a port number (1-65535)") from None
    if not 1 <= port <= 65535:
        raise ValueError("expected a port number (1-65535)")
    return port


def parse_hostport(text: str) -> tuple[str, int]:
    """'127.0.0.1:53', '[::1]:53' or ':8080' (all addresses) -> (host, port)."""
    if not isinstance(text, str):
        raise ValueError("expected HOST:PORT such as 127.0.0.1:8080 or [::1]:8080")
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ValueError("expected HOST:PORT such as 127.0.0.1:8080 or [::1]:8080")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(
                f"{host!r} is not an IP address; use HOST:PORT such as 127.0.0.1:8080"
            ) from None
    else:
        host = "0.0.0.0"
    return host, parse_port(port)


def parse_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """'10.0.0.0/8', '::1/128' or a bare address -> a network."""
    try:
        return ipaddress.ip_network(text, strict=False)
    except (TypeError, ValueError):
        raise ValueError("expected a network in CIDR form such as 10.0.0.0/8 or ::1/128") from None


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
