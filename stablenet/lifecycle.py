"""The shape every listening part shares: ``start()`` opens its sockets (raising StartupError
when it cannot), ``stop()`` stops accepting and drains within a bound; ``async with`` runs one
then the other, so the daemon can stack them in an AsyncExitStack."""

from __future__ import annotations

from types import TracebackType
from typing import Self

from mypy_extensions import mypyc_attr


@mypyc_attr(allow_interpreted_subclasses=True)  # compiled with the proxy; the others subclass it
class Server:
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
