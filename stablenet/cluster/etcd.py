"""A small etcd v3 client over etcd's JSON gateway (HTTP/JSON at /v3/..., served by every etcd
member since 3.4), on aiohttp: ranges, transactions, leases and streaming watches from a
revision, with failover across the members and TLS and password authentication.

Only what the cluster layer needs, and every failure kept apart: ``Unavailable`` (no member
served the request; ``refused`` tells whether every member that was tried answered, refusing the
connection or reporting that etcd itself cannot serve, or whether one could not be reached at
all), ``Compacted`` (a watch asked for history etcd no longer has) and ``EtcdError`` (etcd
rejected the request itself). Nothing here knows stablenet's keys."""

from __future__ import annotations

import asyncio
import base64
import errno
import json
import logging
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp

logger = logging.getLogger(__name__)
MAX_TXN_OPS = 128  # etcd's default --max-txn-ops
GRPC_UNAVAILABLE = 14
GRPC_UNAUTHENTICATED = 16
GRPC_INVALID_ARGUMENT = 3


class EtcdError(Exception):
    """etcd answered and rejected the request (bad argument, permission, lease not found)."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class Unavailable(Exception):
    """No member served the request. ``refused``: every member tried answered (refused the
    connection, or said it cannot serve: no leader, stopping), so the store itself is down;
    False when some member could not be reached at all (timeout, no route): this host may be
    cut off from a store that others still reach."""

    def __init__(self, message: str, refused: bool) -> None:
        super().__init__(message)
        self.refused = refused


class Compacted(Exception):
    """A watch started at a revision etcd has compacted away; read everything again from
    ``revision`` on (a full read) and watch from there."""

    def __init__(self, revision: int) -> None:
        super().__init__(f"revision compacted; oldest kept is {revision}")
        self.revision = revision


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Event:
    kind: Literal["put", "delete"]
    key: str
    value: bytes
    mod_revision: int


@dataclass(frozen=True, slots=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Delete:
    key: str


Op = Put | Delete


def _b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def prefix_end(prefix: str) -> bytes:
    """The range end that covers every key starting with ``prefix``."""
    raw = bytearray(prefix.encode())
    while raw and raw[-1] == 0xFF:
        raw.pop()
    if not raw:
        return b"\0"
    raw[-1] += 1
    return bytes(raw)


def _refusal(exc: BaseException) -> bool:
    """The member answered (refused or reset the connection) rather than staying silent."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return exc.os_error.errno in (errno.ECONNREFUSED, errno.ECONNRESET)
    return isinstance(exc, aiohttp.ServerDisconnectedError | ConnectionResetError)


class EtcdClient:
    """Requests go to the member that last answered; on a failure the next one is tried, so
    one member down costs one failed attempt, not an outage. Use as an async context manager."""

    def __init__(
        self,
        endpoints: Sequence[str],
        timeout: float = 2.0,
        ssl_context: ssl.SSLContext | None = None,
        username: str = "",
        password: str = "",
    ) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoints")
        self.endpoints = tuple(e.rstrip("/") for e in endpoints)
        self.timeout = timeout
        self._ssl = ssl_context
        self._username = username
        self._password = password
        self._token = ""
        self._current = 0
        self._session: aiohttp.ClientSession | None = None
        self.requests = 0  # requests sent, failed attempts included
        self.failovers = 0  # times a request moved on to another member

    async def __aenter__(self) -> EtcdClient:
        connector = aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else False)
        self._session = aiohttp.ClientSession(connector=connector, json_serialize=json.dumps)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def endpoint(self) -> str:
        return self.endpoints[self._current]

    def _headers(self) -> dict[str, str]:
        return {"Authorization": self._token} if self._token else {}

    async def _post(self, base: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """One request to one member; raises EtcdError for etcd's own error answers."""
        assert self._session is not None, "use EtcdClient as an async context manager"
        self.requests += 1
        async with self._session.post(
            base + path,
            json=body,
            headers=self._headers(),
            timeout=aiohttp.ClientTimeout(total=self.timeout),
        ) as resp:
            answer: dict[str, Any] = await resp.json(content_type=None)
        if resp.status != 200 or "error" in answer:
            message = str(answer.get("message") or answer.get("error") or resp.reason)
            raise EtcdError(message, int(answer.get("code") or 0))
        return answer

    async def _authenticate(self, base: str) -> None:
        self._token = ""
        answer = await self._post(
            base, "/v3/auth/authenticate", {"name": self._username, "password": self._password}
        )
        self._token = str(answer.get("token", ""))

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` to ``path`` on the current member, moving on through the others on a
        transport failure or an 'unavailable' answer. Raises Unavailable when none served it."""
        refused = True
        problems: list[str] = []
        for step in range(len(self.endpoints)):
            index = (self._current + step) % len(self.endpoints)
            base = self.endpoints[index]
            try:
                if self._username and not self._token:
                    await self._authenticate(base)
                try:
                    answer = await self._post(base, path, body)
                except EtcdError as exc:
                    if exc.code != GRPC_UNAUTHENTICATED or not self._username:
                        raise
                    await self._authenticate(base)  # the token expired: once more with a new one
                    answer = await self._post(base, path, body)
            except EtcdError as exc:
                if exc.code != GRPC_UNAVAILABLE:
                    raise
                problems.append(f"{base}: {exc}")  # answered: no leader, stopping, ...
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
                refused = refused and _refusal(exc)
                problems.append(f"{base}: {exc!r}")
            else:
                if index != self._current:
                    logger.info("etcd: now using %s", base)
                    self.failovers += 1
                    self._current = index
                return answer
        raise Unavailable("; ".join(problems), refused)

    async def range_prefix(self, prefix: str) -> tuple[int, list[KeyValue]]:
        """Every key under ``prefix`` and the store's revision they were read at."""
        answer = await self.call(
            "/v3/kv/range", {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix))}
        )
        revision = int(answer.get("header", {}).get("revision", 0))
        kvs = [
            KeyValue(
                _unb64(kv.get("key")).decode(),
                _unb64(kv.get("value")),
                int(kv.get("mod_revision", 0)),
                int(kv.get("lease", 0)),
            )
            for kv in answer.get("kvs", ())
        ]
        return revision, kvs

    async def txn(self, ops: Sequence[Op]) -> int:
        """Apply puts and deletes atomically (split in chunks of etcd's operation limit);
        returns the revision after the last chunk."""
        revision = 0
        for start in range(0, len(ops), MAX_TXN_OPS):
            success: list[dict[str, Any]] = []
            for op in ops[start : start + MAX_TXN_OPS]:
                if isinstance(op, Put):
                    put: dict[str, Any] = {"key": _b64(op.key), "value": _b64(op.value)}
                    if op.lease:
                        put["lease"] = str(op.lease)
                    success.append({"request_put": put})
                else:
                    success.append({"request_delete_range": {"key": _b64(op.key)}})
            answer = await self.call("/v3/kv/txn", {"success": success})
            revision = int(answer.get("header", {}).get("revision", 0))
        return revision

    async def grant(self, ttl: int) -> int:
        answer = await self.call("/v3/lease/grant", {"TTL": str(ttl)})
        return int(answer["ID"])

    async def keepalive(self, lease: int) -> int:
        """Refresh a lease; its TTL now, 0 when etcd no longer has it (expired or revoked)."""
        answer = await self.call("/v3/lease/keepalive", {"ID": str(lease)})
        return int(answer.get("result", {}).get("TTL", 0))

    async def revoke(self, lease: int) -> None:
        try:
            await self.call("/v3/lease/revoke", {"ID": str(lease)})
        except EtcdError:
            pass  # already gone

    async def watch(
        self, prefix: str, start_revision: int
    ) -> AsyncIterator[tuple[int, list[Event]]]:
        """(revision, events) for every change under ``prefix`` from ``start_revision`` on, in
        order, from one member's stream; the first has no events (the watch was created).
        Raises Compacted when that history is gone and Unavailable when the stream cannot be
        opened or breaks: start again after the last event seen (another member is tried
        first)."""
        assert self._session is not None, "use EtcdClient as an async context manager"
        base = self.endpoint
        body = {
            "create_request": {
                "key": _b64(prefix),
                "range_end": _b64(prefix_end(prefix)),
                "start_revision": str(start_revision),
            }
        }
        try:
            if self._username and not self._token:
                await self._authenticate(base)
            self.requests += 1
            async with self._session.post(
                base + "/v3/watch",
                json=body,
                headers=self._headers(),
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=self.timeout, sock_connect=self.timeout
                ),
            ) as resp:
                if resp.status != 200:
                    raise Unavailable(f"{base}: watch answered HTTP {resp.status}", True)
                buffer = b""
                async for chunk in resp.content.iter_any():
                    buffer += chunk
                    while b"\n" in buffer:
                        line, buffer = buffer.split(b"\n", 1)
                        if line.strip():
                            yield _watch_message(json.loads(line))
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError, EtcdError) as exc:
            self._next()
            raise Unavailable(f"{base}: watch: {exc!r}", _refusal(exc)) from None
        self._next()
        raise Unavailable(f"{base}: watch stream ended", True)

    def _next(self) -> None:
        self._current = (self._current + 1) % len(self.endpoints)


def _watch_message(message: dict[str, Any]) -> tuple[int, list[Event]]:
    """One line of the watch stream as (revision, events); no events for 'created'."""
    if "error" in message:
        error = message["error"]
        raise EtcdError(str(error.get("message", error)), int(error.get("grpc_code", 0)))
    result = message.get("result", {})
    compact = int(result.get("compact_revision", 0))
    if compact:
        raise Compacted(compact)
    if result.get("canceled"):
        raise EtcdError(str(result.get("cancel_reason") or "watch canceled"))
    revision = int(result.get("header", {}).get("revision", 0))
    events = [
        Event(
            "delete" if ev.get("type") == "DELETE" else "put",
            _unb64(ev["kv"].get("key")).decode(),
            _unb64(ev["kv"].get("value")),
            int(ev["kv"].get("mod_revision", 0)),
        )
        for ev in result.get("events", ())
    ]
    return revision, events


def tls_context(ca_file: str, cert_file: str, key_file: str) -> ssl.SSLContext:
    """A client TLS context: verify etcd with ``ca_file`` (the system's CAs when empty) and
    present ``cert_file``/``key_file`` when set."""
    context = ssl.create_default_context(cafile=ca_file or None)
    if cert_file:
        context.load_cert_chain(cert_file, key_file)
    return context


async def wait_healthy(endpoint: str) -> None:
    """Until GET /health on one member says true (for scripts and tests starting etcd; bound
    the wait with ``asyncio.timeout``)."""
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(
                    endpoint + "/health", timeout=aiohttp.ClientTimeout(total=1)
                ) as resp:
                    if resp.status == 200 and (await resp.json()).get("health") == "true":
                        return
            except (aiohttp.ClientError, TimeoutError, ValueError):
                pass
            await asyncio.sleep(0.05)
