"""Forwarding to upstream resolvers: which upstreams (config, else the host's /etc/resolv.conf,
never this server itself), and the asyncio client that asks them: UDP from a fresh random port
with a random id, TCP retry when the reply is truncated, the next upstream when one fails or
answers FORMERR, SERVFAIL, NOTIMP or REFUSED, one deadline for all attempts, identical questions
in flight coalesced, a cap on questions in flight. Caching is core.py's job; this
module only moves bytes and never touches the registry."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from stablenet.dns import wire
from stablenet.dns.stats import DnsStats
from stablenet.units import parse_hostport

logger = logging.getLogger(__name__)

Question = wire.Question
# Answers that say "not this upstream": the next one is asked; only when every upstream failed
# does the client get SERVFAIL.
_TRY_NEXT = frozenset(
    (wire.Rcode.FORMERR, wire.Rcode.SERVFAIL, wire.Rcode.NOTIMP, wire.Rcode.REFUSED)
)


@dataclass(frozen=True, slots=True)
class Upstream:
    host: str
    port: int = 53

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_upstream(text: str) -> Upstream:
    """'10.0.0.2', '10.0.0.2:5353', '::1' or '[::1]:5353'."""
    try:
        return Upstream(str(ipaddress.ip_address(text)))
    except ValueError:
        host, port = parse_hostport(text)
        return Upstream(host, port)


def resolv_conf_upstreams(text: str) -> list[Upstream]:
    """The nameservers of a resolv.conf, in order (link-local zone ids dropped)."""
    out: list[Upstream] = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                out.append(Upstream(str(ipaddress.ip_address(parts[1].partition("%")[0]))))
            except ValueError:
                continue
    return out


def without_self(
    upstreams: Iterable[Upstream], own: Iterable[tuple[str, int]], local: Iterable[str] = ()
) -> list[Upstream]:
    """Upstreams minus this server: any (address, port) it listens on, and for a wildcard or
    loopback listener any loopback or ``local`` address on that port."""
    own = list(own)
    local_set = set(local)
    kept = []
    for up in upstreams:
        is_self = False
        for host, port in own:
            if port != up.port:
                continue
            if host == up.host:
                is_self = True
            elif host in ("0.0.0.0", "::") and (
                ipaddress.ip_address(up.host).is_loopback or up.host in local_set
            ):
                is_self = True
        if not is_self:
            kept.append(up)
    return kept


class _UdpExchange(asyncio.DatagramProtocol):
    def __init__(self, qid: int, question: bytes, done: asyncio.Future[bytes | None]) -> None:
        self._qid = qid
        self._question = question
        self._done = done

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if not self._done.done() and wire.answers_query(data, self._qid, self._question):
            self._done.set_result(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and the like: this upstream is not answering.
        if not self._done.done():
            self._done.set_result(None)


class Forwarder:
    """Asks upstreams; ``ask`` returns the raw reply, or None on timeout/failure/overload."""

    def __init__(
        self,
        upstreams: Sequence[Upstream],
        timeout: float,
        max_inflight: int,
        stats: DnsStats | None = None,
    ) -> None:
        self.upstreams = tuple(upstreams)
        self.timeout = timeout
        self.max_inflight = max_inflight
        self.stats = stats if stats is not None else DnsStats()
        self._inflight: dict[Question, asyncio.Future[bytes | None]] = {}

    async def ask(self, question: Question) -> bytes | None:
        pending = self._inflight.get(question)
        if pending is not None:
            return await asyncio.shield(pending)
        if len(self._inflight) >= self.max_inflight:
            self.stats.forward_overflow += 1
            return None
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes | None] = loop.create_future()
        self._inflight[question] = future
        result: bytes | None = None
        try:
            self.stats.forwarded += 1
            result = await self._ask_upstreams(question)
        finally:
            del self._inflight[question]
            if not future.done():
                future.set_result(result)
        return result

    async def _ask_upstreams(self, question: Question) -> bytes | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        for index, upstream in enumerate(self.upstreams):
            budget = (deadline - loop.time()) / (len(self.upstreams) - index)
            if budget <= 0:
                break
            qid = secrets.randbits(16)
            query = wire.encode_query(qid, *question)
            section = query[wire.HEADER.size : -len(wire.opt_record())]
            try:
                async with asyncio.timeout(budget):
                    reply = await self._udp(upstream, query, qid, section)
                    if reply is not None and wire.truncated(reply):
                        reply = await self._tcp(upstream, query, qid, section)
            except (TimeoutError, OSError) as exc:
                logger.debug("upstream %s: %s", upstream, exc or type(exc).__name__)
                continue
            if reply is None:
                logger.debug("upstream %s refused the connection", upstream)
            elif wire.rcode_of(reply) in _TRY_NEXT:
                self.stats.upstream_errors += 1
                logger.debug("upstream %s answered rcode %d", upstream, wire.rcode_of(reply))
            else:
                return reply
        return None

    async def _udp(
        self, upstream: Upstream, query: bytes, qid: int, section: bytes
    ) -> bytes | None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bytes | None] = loop.create_future()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UdpExchange(qid, section, done), remote_addr=(upstream.host, upstream.port)
        )
        try:
            transport.sendto(query)
            return await done
        finally:
            transport.close()

    async def _tcp(
        self, upstream: Upstream, query: bytes, qid: int, section: bytes
    ) -> bytes | None:
        reader, writer = await asyncio.open_connection(upstream.host, upstream.port)
        try:
            writer.write(struct.pack("!H", len(query)) + query)
            await writer.drain()
            size = struct.unpack("!H", await reader.readexactly(2))[0]
            reply = await reader.readexactly(size)
        except asyncio.IncompleteReadError:
            return None
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        return reply if wire.answers_query(reply, qid, section) else None
