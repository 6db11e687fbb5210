"""A dedicated listener declared by a container label, in the real daemon: it opens when the
container starts, carries plain TCP to it, survives its restart, and DNS answers the service's
name with the listener's address."""

from __future__ import annotations

import asyncio

import dns.asyncquery
import dns.message

from tests.helpers import Containers, free_port, off_loop
from tests.test_cli import start_daemon, stop_daemon, wait_for_line


async def http_over_tcp(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /cgi-bin/whoami HTTP/1.0\r\n\r\n")
    async with asyncio.timeout(10):
        answer = await reader.read()
    writer.close()
    return answer


async def test_label_declared_tcp_listener(containers: Containers) -> None:
    tcp_port = free_port()
    daemon = await start_daemon(serving=True)
    dns_port = daemon.dns_port
    try:
        box = await off_loop(
            containers.run,
            "kv",
            labels={
                "stablenet.service": "kv",
                "stablenet.port": "80",
                "stablenet.proxy.listen": f"tcp:127.0.0.1:{tcp_port}",
            },
        )
        await wait_for_line(daemon.proc, f"proxy listening on 127.0.0.1:{tcp_port}", daemon.log)
        answer = await http_over_tcp(tcp_port)
        assert answer.startswith(b"HTTP/1.") and answer.rstrip().endswith(box.id[:12].encode())
        reply = await dns.asyncquery.udp(
            dns.message.make_query("kv.stablenet.internal", "A"), "127.0.0.1", port=dns_port
        )
        assert [rr.to_text() for rrset in reply.answer for rr in rrset] == ["127.0.0.1"]
        # Across a restart the listener stays: a connection made meanwhile is held, then served.
        await off_loop(box.stop, timeout=1)
        pending = asyncio.get_running_loop().create_task(http_over_tcp(tcp_port))
        await off_loop(box.start)
        answer = await pending
        assert answer.rstrip().endswith(box.id[:12].encode())
    finally:
        await stop_daemon(daemon)
