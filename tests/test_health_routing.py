"""DNS answers and proxy picks follow the health state, in the real daemon: an endpoint that
fails its check leaves both; a backend that refuses connections is ejected by the proxy's own
reports (passive detection, no active check at all) while clients see no error."""

from __future__ import annotations

import aiohttp
import dns.asyncquery
import dns.message

from tests.helpers import Containers, ip_of, off_loop
from tests.test_cli import (
    RunningDaemon,
    start_daemon,
    stop_daemon,
    wait_for_line,
    wait_for_lines,
)

HOST = "routed.stablenet.internal"
CHECKED = {
    "stablenet.service": "routed",
    "stablenet.port": "80",
    "stablenet.health.path": "/healthz",
    "stablenet.health.interval": "300ms",
    "stablenet.health.timeout": "300ms",
    "stablenet.health.fall": "1",
}


async def resolve(port: int) -> set[str]:
    reply = await dns.asyncquery.udp(
        dns.message.make_query(HOST, "A"), "127.0.0.1", port=port, timeout=5
    )
    return {rdata.to_text() for rrset in reply.answer for rdata in rrset}


async def served_by(http: aiohttp.ClientSession, proxy_port: int, count: int) -> set[str]:
    names = set()
    for _ in range(count):
        async with http.get(
            f"http://127.0.0.1:{proxy_port}/cgi-bin/whoami", headers={"Host": HOST}
        ) as resp:
            assert resp.status == 200
            names.add((await resp.text()).strip())
    return names


async def test_dns_and_proxy_follow_active_and_passive_health(containers: Containers) -> None:
    daemon: RunningDaemon = await start_daemon(
        serving=True,
        env={
            "STABLENET_DNS_TTL": "1s",
            "STABLENET_HEALTH_EJECT_AFTER": "3",
            "STABLENET_HEALTH_EJECT_TIME": "1m",
        },
    )
    dns_port, proxy_port = daemon.dns_port, daemon.proxy_port
    try:
        good = await off_loop(containers.run, "good", labels=CHECKED)
        sick = await off_loop(containers.run, "sick", labels=CHECKED)
        await wait_for_lines(
            daemon.proc,
            [f"{containers.name(name)}: starting -> ready" for name in ("good", "sick")],
            daemon.log,
        )
        assert await resolve(dns_port) == {ip_of(good), ip_of(sick)}
        async with aiohttp.ClientSession() as http:
            assert await served_by(http, proxy_port, 20) == {good.id[:12], sick.id[:12]}

            # Active: the check fails -> out of DNS and out of the proxy's picks.
            await off_loop(sick.exec_run, ["rm", "/www/healthz"])
            await wait_for_line(
                daemon.proc, f"{containers.name('sick')}: ready -> unhealthy", daemon.log
            )
            assert await resolve(dns_port) == {ip_of(good)}
            assert await served_by(http, proxy_port, 20) == {good.id[:12]}

            # Passive: no active check, nothing listens. Requests still succeed (retried on
            # the good replica) and the proxy's reports eject it after three refusals.
            mute = await off_loop(
                containers.run,
                "mute",
                command=["sleep", "3600"],
                labels={"stablenet.service": "routed", "stablenet.port": "80"},
            )
            await wait_for_line(
                daemon.proc, f"{containers.name('mute')} added to service routed", daemon.log
            )
            assert await served_by(http, proxy_port, 60) == {good.id[:12]}
            await wait_for_line(daemon.proc, "ejected after 3 failed requests", daemon.log)
            assert ip_of(mute) not in await resolve(dns_port)
    finally:
        await stop_daemon(daemon)
