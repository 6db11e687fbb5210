"""Plain TCP proxying for a service's dedicated listener (Redis, Postgres, ...): each client
connection is joined to one READY endpoint, chosen by the balancer; connection failures move on
to another endpoint; with none ready the client waits up to hold_timeout. Bytes pass unchanged,
with flow control both ways."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from stablenet.model import Endpoint
from stablenet.proxy.balance import Target, retry_backoff, target_of

if TYPE_CHECKING:
    from stablenet.proxy.dispatch import Dispatcher

logger = logging.getLogger(__name__)


class _Pipe(asyncio.Protocol):
    """One side of a joined pair: what it reads, the other side writes."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Pipe | None = None
        self.early: list[bytes] = []
        self.on_lost: list[Callable[[], None]] = []
        self.got_eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:
            self.early.append(data)

    def eof_received(self) -> bool | None:
        self.got_eof = True
        peer = self.peer
        if peer is not None and peer.got_eof:
            if peer.transport is not None:
                peer.transport.close()  # both directions are done
            return False
        if peer is not None and peer.transport is not None and peer.transport.can_write_eof():
            peer.transport.write_eof()
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        for callback in self.on_lost:
            callback()
        self.on_lost.clear()
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class TcpClient(_Pipe):
    def __init__(self, dispatcher: Dispatcher, service: str) -> None:
        super().__init__()
        self.dispatcher = dispatcher
        self.service = service
        self.idle_since = 0.0  # a TCP connection is never idle for the connection budget

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not self.dispatcher.gate.accept(
            self, cast(asyncio.Transport, transport), self.dispatcher.loop.time()
        ):
            return  # over the connection budget: refused, and closed already
        cast(asyncio.Transport, transport).pause_reading()  # until joined to an endpoint
        self.dispatcher.tcp_clients.add(self)
        self.dispatcher.count(self.service).requests += 1
        self.dispatcher.spawn(self._join(), name=f"tcp-join-{self.service}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.dispatcher.tcp_clients.discard(self)
        self.dispatcher.gate.release(self)  # the connection budget
        super().connection_lost(exc)

    async def _join(self) -> None:
        dispatcher = self.dispatcher
        loop = dispatcher.loop
        deadline = loop.time() + dispatcher.hold_timeout
        tried: set[Target] = set()
        held = False
        backoff = 0.0
        while self.transport is not None:
            snap = dispatcher.registry.snapshot
            ready = snap.ready.get(self.service, ())
            ep = dispatcher.balancer.pick(self.service, ready, tried)
            if ep is None and ready and loop.time() < deadline:
                # Every ready endpoint refused (a replica back but not listening yet):
                # try them again shortly, within the hold timeout.
                wait, backoff = retry_backoff(backoff, loop.time(), deadline)
                await asyncio.sleep(wait)
                tried.clear()
                continue
            if ep is None:
                if not held:
                    held = True
                    dispatcher.count(self.service).holds += 1
                    dispatcher.on_hold(self.service)
                waiting = dispatcher.tcp_waiting
                waiting[self.service] = waiting.get(self.service, 0) + 1
                try:
                    async with asyncio.timeout_at(deadline):
                        await dispatcher.registry.until(
                            lambda s: any(
                                target_of(e) not in tried for e in s.ready.get(self.service, ())
                            )
                        )
                except TimeoutError:
                    logger.debug("tcp %s: no ready endpoint within hold_timeout", self.service)
                    dispatcher.count(self.service).errors += 1
                    if self.transport is not None:
                        self.transport.close()
                    return
                finally:
                    left = waiting.get(self.service, 1) - 1
                    if left > 0:
                        waiting[self.service] = left
                    else:
                        waiting.pop(self.service, None)
                continue
            if await self._connect(ep):
                return
            tried.add(target_of(ep))
            dispatcher.count(self.service).retries += 1

    async def _connect(self, ep: Endpoint) -> bool:
        dispatcher = self.dispatcher
        upstream = _Pipe()
        dispatcher.balancer.begin(ep)
        try:
            async with asyncio.timeout(dispatcher.connect_timeout):
                await dispatcher.loop.create_connection(lambda: upstream, ep.address, ep.port or 0)
        except (OSError, TimeoutError) as exc:
            dispatcher.balancer.end(ep)
            dispatcher.report(ep, False, f"connect failed: {exc}")
            return False
        if self.transport is None or upstream.transport is None:
            dispatcher.balancer.end(ep)
            if upstream.transport is not None:
                upstream.transport.close()
            return True
        dispatcher.report(ep, True, "connected")
        upstream.peer, self.peer = self, upstream
        upstream.on_lost.append(lambda: dispatcher.balancer.end(ep))
        if self.early:
            upstream.transport.write(b"".join(self.early))
            self.early.clear()
        self.transport.resume_reading()
        return True
