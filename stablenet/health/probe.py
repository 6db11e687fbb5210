"""Probes: one HTTP GET or one TCP connect against an endpoint, with a timeout, turned into a
pass/fail and a short reason. Raw asyncio streams: a check costs one connection and a status
line, not an HTTP client session."""

from __future__ import annotations

import asyncio
import errno
from dataclasses import dataclass

from stablenet.model import HealthSpec

_MAX_STATUS_LINE = 1024


@dataclass(frozen=True, slots=True)
class ProbeResult:
    passing: bool
    reason: str


def _describe(exc: OSError) -> str:
    if exc.errno == errno.ECONNREFUSED:
        return "connection refused"
    if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "no route to host"
    if exc.errno == errno.ECONNRESET:
        return "connection reset"
    return exc.strerror or type(exc).__name__


async def probe(address: str, port: int, spec: HealthSpec | None, within: float) -> ProbeResult:
    """HTTP GET spec.path when the spec has a path, else a TCP connect; ``within`` seconds."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(within):
            reader, writer = await asyncio.open_connection(address, port)
            if spec is None or spec.path is None:
                return ProbeResult(True, "TCP connect ok")
            host = spec.host or address
            if ":" in host and not host.startswith("["):
                host = f"[{host}]"
            writer.write(
                f"GET {spec.path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: stablenet-health\r\n"
                "Accept: */*\r\nConnection: close\r\n\r\n".encode("latin-1")
            )
            line = await reader.readuntil(b"\n")
            return _judge(line, spec)
    except TimeoutError:
        return ProbeResult(False, f"timeout after {within:g}s")
    except asyncio.IncompleteReadError:
        return ProbeResult(False, "connection closed before a response")
    except asyncio.LimitOverrunError:
        return ProbeResult(False, "malformed response: status line too long")
    except OSError as exc:
        return ProbeResult(False, _describe(exc))
    finally:
        if writer is not None:
            writer.close()


def _judge(line: bytes, spec: HealthSpec) -> ProbeResult:
    parts = line[:_MAX_STATUS_LINE].decode("latin-1").split(None, 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        return ProbeResult(False, "malformed response: not an HTTP status line")
    code = int(parts[1])
    if spec.status_min <= code <= spec.status_max:
        return ProbeResult(True, f"HTTP {code}")
    return ProbeResult(False, f"HTTP {code} (expected {spec.status_min}-{spec.status_max})")
