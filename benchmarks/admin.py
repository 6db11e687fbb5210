"""What the benchmarks read from a running stablenet's admin API."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp


async def follow_events(admin: str, into: list[dict[str, Any]], stop: asyncio.Event) -> None:
    """Append the admin API's recent events to ``into`` (it holds the last 500 only, so they
    are read every half second) until ``stop``, and once more after it."""

    async def read(http: aiohttp.ClientSession) -> None:
        since = into[-1]["seq"] if into else 0
        with contextlib.suppress(aiohttp.ClientError):
            async with http.get(f"{admin}/v1/events", params={"since": since}) as r:
                into.extend((await r.json())["events"])

    async with aiohttp.ClientSession() as http:
        while not stop.is_set():
            await read(http)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
        await read(http)
