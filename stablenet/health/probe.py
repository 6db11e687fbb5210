"""Probes: one HTTP GET or one TCP connect against an endpoint, with a timeout, turned into a
pass/fail and a short reason. Raw asyncio streams: a check costs one connection and a status
line, not an HTTP client session."""

from __future__ import annotations

import asyncio
import errno
from dataclasses import dataclass
from typing import cast

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


class _ProbeProtocol(asyncio.Protocol):
    """Sends one request on connect and resolves with the first response line (or b'' for a
    plain TCP check). No stream objects: a check is one connection and one small read."""

    def __init__(self, request: bytes, done: asyncio.Future[bytes]) -> None:
        self._request = request
        self._done = done
        self._buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._request:
            self._done.set_result(b"")
            return
        cast(asyncio.Transport, transport).write(self._request)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        end = self._buffer.find(b"\n")
        if end >= 0 and not self._done.done():
            self._done.set_result(self._buffer[:end])
        elif len(self._buffer) > _MAX_STATUS_LINE and not self._done.done():
            self._done.set_exception(asyncio.LimitOverrunError("status line too long", 0))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done.done():
            self._done.set_exception(
                exc if exc is not None else asyncio.IncompleteReadError(self._buffer, None)
            )


async def probe(address: str, port: int, spec: HealthSpec | None, within: float) -> ProbeResult:
    """HTTP GET spec.path when the spec has a path, else a TCP connect; ``within`` seconds."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[bytes] = loop.create_future()
    request = b""
    if spec is not None and spec.path is not None:
        host = spec.host or (f"[{address}]" if ":" in address else address)
        request = (
            f"GET {spec.path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: stablenet-health\r\n"
            "Accept: */*\r\nConnection: close\r\n\r\n".encode("latin-1", "replace")
        )
    transport: asyncio.BaseTransport | None = None
    try:
        async with asyncio.timeout(within):
            transport, _ = await loop.create_connection(
                lambda: _ProbeProtocol(request, done), address, port
            )
            line = await done
    except TimeoutError:
        return ProbeResult(False, f"timeout after {within:g}s")
    except asyncio.IncompleteReadError:
        return ProbeResult(False, "connection closed before a response")
    except asyncio.LimitOverrunError:
        return ProbeResult(False, "malformed response: status line too long")
    except OSError as exc:
        return ProbeResult(False, _describe(exc))
    finally:
        if transport is not None:
            transport.close()
    if spec is None or spec.path is None:
        return ProbeResult(True, "TCP connect ok")
    return _judge(line, spec)


def _judge(line: bytes, spec: HealthSpec) -> ProbeResult:
    parts = line[:_MAX_STATUS_LINE].decode("latin-1").split(None, 2)
    if len(parts) < 2:
        return ProbeResult(False, "malformed response: not an HTTP status line")
    code_text = parts[1]
    if not (parts[0].startswith("HTTP/") and code_text.isascii() and code_text.isdigit()):
        return ProbeResult(False, "malformed response: not an HTTP status line")
    code = int(code_text)
    if spec.status_min <= code <= spec.status_max:
        return ProbeResult(True, f"HTTP {code}")
    return ProbeResult(False, f"HTTP {code} (expected {spec.status_min}-{spec.status_max})")
