"""The shape every listening part shares: ``start()`` opens its sockets (raising StartupError
when it cannot), ``stop()`` stops accepting and drains within a bound; ``async with`` runs one
then the other, so the daemon can stack them in an AsyncExitStack. A server also owns the tasks
it spawns: failures are logged, and ``cancel_tasks`` ends them all on the way out."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, Self

from mypy_extensions import mypyc_attr

logger = logging.getLogger(__name__)

SocketSource = Callable[[str, str, int], socket.socket | None]
"""(kind "tcp"|"udp", host, port) -> a bound socket to serve on, or None to bind as usual
(sockets.Sockets.take: bound early, or inherited from the stablenet this one took over from)."""


def run_on_uvloop(main: Coroutine[Any, Any, None]) -> None:
    """Run a process's main coroutine on uvloop when available, else on the default loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


def own_socket(kind: str, host: str, port: int) -> socket.socket | None:
    return None


@mypyc_attr(allow_interpreted_subclasses=True)  # compiled with the proxy; the others subclass it
class Server:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        self.sockets: SocketSource = own_socket

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def spawn(self, coro: Coroutine[Any, Any, None], name: str | None = None) -> None:
        """Run a coroutine owned by this server until it ends or ``cancel_tasks``."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("task %s failed", task.get_name(), exc_info=task.exception())

    async def cancel_tasks(self) -> None:
        """Cancel every task this server spawned and wait for them to end."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
