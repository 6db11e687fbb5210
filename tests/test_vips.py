"""Virtual addresses end to end: a real engine, real containers, the real nftables table.
Every test installs the guard first (tests/vips_support.py): nothing sent to the test range can
leave the machine, whatever the rules under test do."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import pytest

from stablenet.errors import StartupError
from stablenet.vips import rules
from tests.helpers import HTTPD, Containers, eventually, ip_of, off_loop, until
from tests.vips_support import (
    GRACEFUL_HTTPD,
    PY_MOUNTS,
    UDP_NAMER,
    VIP_RANGE,
    daemon_config,
    guard,
    guard_drops,
    nft,
    running,
)

pytestmark = pytest.mark.engine


@pytest.fixture(autouse=True)
def guarded() -> Iterator[None]:
    with guard():
        yield
    # A table left by a test (stablenet leaves it on purpose) must not outlive the test.
    try:
        nft("delete", "table", "ip", "stablenet")
    except RuntimeError:
        pass


def web_labels(service: str, **more: str) -> dict[str, str]:
    return {
        "stablenet.enable": "true",
        "stablenet.service": service,
        "stablenet.port": "80",
        **more,
    }


def http_get(host: str, port: int, timeout: float = 3.0) -> str:
    """One request on its own connection; the body (the CGI names the replica)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(b"GET /cgi-bin/whoami HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.") or b" 200 " not in head.split(b"\r\n")[0] + b" ":
        raise OSError(f"unexpected answer {head[:40]!r}")
    return body.decode().strip()


def vip_of(daemon: Any, service: str) -> str:
    address = daemon.vips.addresses[service]
    assert ipaddress.IPv4Address(address) in ipaddress.IPv4Network(VIP_RANGE)
    return str(address)


async def served(daemon: Any, vip: str, proto: str, port: int, count: int, within: float = 20):  # type: ignore[no-untyped-def]
    """Wait until the kernel table holds ``count`` endpoints for the service port."""
    async with asyncio.timeout(within):
        await daemon.vips.until(lambda t: len(set(t.targets((vip, proto, port)))) == count)


def in_container(container: Any, command: str) -> str:
    code, out = container.exec_run(["sh", "-c", command])
    assert code == 0, out
    return str(out.decode())


async def test_tcp_and_udp_on_the_virtual_address_from_host_container_and_itself(
    containers: Containers, tmp_path: Path
) -> None:
    web, echo = containers.name("web"), containers.name("echo")
    for i in (1, 2):
        await off_loop(containers.run, f"web{i}", web_labels(web))
        await off_loop(
            containers.run,
            f"echo{i}",
            {
                "stablenet.enable": "true",
                "stablenet.service": echo,
                "stablenet.vip.ports": "53:5353/udp",
            },
            command=["/usr/bin/python3.11", "-c", UDP_NAMER],
            volumes=PY_MOUNTS,
        )
    client = await off_loop(
        containers.run, "client", {}, command=["sleep", "600"], volumes=PY_MOUNTS
    )
    cfg = daemon_config(tmp_path)
    async with running(cfg) as daemon:
        vip, uvip = vip_of(daemon, web), vip_of(daemon, echo)
        await served(daemon, vip, "tcp", 80, 2)
        await served(daemon, uvip, "udp", 53, 2)
        listed = nft("list", "table", "ip", "stablenet")
        assert f"{vip} . tcp . 80 : goto pick-2" in listed

        # From the host: both replicas answer, picked at random per connection.
        seen = {await off_loop(http_get, vip, 80) for _ in range(30)}
        assert len(seen) == 2
        # UDP from the host: one socket per flow, replies come from the virtual address.
        names = set()
        for _ in range(20):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                udp.settimeout(2)
                udp.sendto(b"?", (uvip, 53))
                data, peer = udp.recvfrom(100)
                assert peer == (uvip, 53)
                names.add(data)
        assert len(names) == 2

        # From a container, and a replica reaching its own service (hairpin).
        request = f"printf 'GET /cgi-bin/whoami HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {vip} 80"
        replica = containers.client.containers.get(containers.name("web1"))
        for who in (client, replica):
            runs = [await off_loop(who.exec_run, ["sh", "-c", request]) for _ in range(16)]
            bodies = [r.output.decode() for r in runs]
            assert all("200 OK" in b for b in bodies), (who.name, bodies)
        # Some of the replica's requests were translated back to itself (hairpin).
        assert any(b.rstrip().endswith(str(replica.id)[:12]) for b in bodies)
        udp_cmd = (
            '/usr/bin/python3.11 -c "import socket; s = socket.socket(2, 2); s.settimeout(2); '
            f"s.sendto(b'?', ('{uvip}', 53)); print(s.recv(100).decode())\""
        )
        assert (await off_loop(in_container, client, udp_cmd)).strip()

        # A port the service does not serve is refused at once, not sent away.
        began = time.monotonic()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((vip, 81), timeout=3)
        assert time.monotonic() - began < 1

        # DNS answers the service with its virtual address, with a long TTL; SRV keeps the
        # replicas.
        dns_port = int(cfg.dns.listen[0].rpartition(":")[2])
        query = dns.message.make_query(f"{web}.stablenet.internal", "A")
        reply = await off_loop(dns.query.udp, query, "127.0.0.1", port=dns_port, timeout=2)
        answer = reply.answer[0]
        assert [r.address for r in answer] == [vip] and answer.ttl >= 600
        srv = dns.message.make_query(f"_80._tcp.{web}.stablenet.internal", "SRV")
        reply = await off_loop(dns.query.udp, srv, "127.0.0.1", port=dns_port, timeout=2)
        assert len(reply.answer[0]) == 2

        # Shown in the admin API.
        admin = f"http://{cfg.admin.listen}/v1/services/{web}"
        body = json.loads(await off_loop(lambda: urllib.request.urlopen(admin, timeout=3).read()))
        assert body["vip"]["address"] == vip and body["vip"]["path"] == "kernel"
        assert body["vip"]["ports"][0].startswith("tcp/80->")
        metrics = f"http://{cfg.admin.listen}/metrics"
        text = (await off_loop(lambda: urllib.request.urlopen(metrics, timeout=3).read())).decode()
        assert "stablenet_vip_update_seconds_bucket" in text
    assert guard_drops() == 0


async def test_rolling_replace_under_load_fails_no_request(
    containers: Containers, tmp_path: Path
) -> None:
    web = containers.name("roll")
    old = [
        await off_loop(containers.run, f"old{i}", web_labels(web), command=GRACEFUL_HTTPD)
        for i in (1, 2)
    ]
    async with running(daemon_config(tmp_path)) as daemon:
        vip = vip_of(daemon, web)
        await served(daemon, vip, "tcp", 80, 2)
        done = asyncio.Event()
        results: list[str | Exception] = []

        def worker() -> None:
            deadline = time.monotonic() + 60  # bounded even if the test hangs
            while not done.is_set() and time.monotonic() < deadline:
                try:
                    results.append(http_get(vip, 80))
                except OSError as exc:
                    results.append(exc)

        load = [asyncio.get_running_loop().run_in_executor(None, worker) for _ in range(4)]
        await eventually(lambda: len(results) >= 20, 10)  # the load runs before the first
        for i, container in enumerate(old, 1):
            await off_loop(containers.run, f"new{i}", web_labels(web), command=GRACEFUL_HTTPD)
            await served(daemon, vip, "tcp", 80, 3)
            await off_loop(container.stop, timeout=10)
            await served(daemon, vip, "tcp", 80, 2)
        after = len(results)
        await eventually(lambda: len(results) >= after + 20, 10)  # and on the new ones only
        done.set()
        await asyncio.gather(*load)
    failures = [r for r in results if isinstance(r, Exception)]
    assert len(results) > 100 and not failures, (len(results), failures[:3])
    new_ids = {c[:12] for c in containers.created[-2:]}
    assert {r for r in results[-20:] if isinstance(r, str)} <= new_ids


async def test_udp_flow_moves_off_a_removed_endpoint_within_a_second(
    containers: Containers, tmp_path: Path
) -> None:
    echo = containers.name("uecho")
    labels = {
        "stablenet.enable": "true",
        "stablenet.service": echo,
        "stablenet.vip.ports": "53:5353/udp",
    }
    for i in (1, 2):
        await off_loop(
            containers.run,
            f"u{i}",
            labels,
            command=["/usr/bin/python3.11", "-c", UDP_NAMER],
            volumes=PY_MOUNTS,
        )
    async with running(daemon_config(tmp_path)) as daemon:
        vip = vip_of(daemon, echo)
        await served(daemon, vip, "udp", 53, 2)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as flow:
            flow.settimeout(0.1)

            def ask() -> str | None:
                flow.sendto(b"?", (vip, 53))
                try:
                    return flow.recvfrom(100)[0].decode()
                except TimeoutError:
                    return None

            first = await off_loop(ask)
            assert first is not None
            assert all([await off_loop(ask) == first for _ in range(5)])  # one flow, one replica
            victim = containers.client.containers.get(first)
            stopped = time.monotonic()
            await off_loop(victim.kill)
            moved: str | None = None
            while time.monotonic() - stopped < 5:
                answer = await off_loop(ask)
                if answer is not None and answer != first:
                    moved = answer
                    break
            took = time.monotonic() - stopped
        assert moved is not None and took < 1.0, (moved, took)
        assert daemon.vips.stats.conntrack_deleted >= 1


async def test_address_survives_restarts_of_stablenet_and_of_every_replica(
    containers: Containers, tmp_path: Path
) -> None:
    web = containers.name("keep")
    replicas = [await off_loop(containers.run, f"r{i}", web_labels(web)) for i in (1, 2)]
    cfg = daemon_config(tmp_path)
    async with running(cfg) as daemon:
        vip = vip_of(daemon, web)
        await served(daemon, vip, "tcp", 80, 2)
    # stablenet is gone: the kernel keeps serving the last state.
    assert await off_loop(http_get, vip, 80)
    saved = json.loads((tmp_path / "vips.json").read_text())
    assert saved["services"][web] == vip
    async with running(daemon_config(tmp_path)) as daemon:
        assert vip_of(daemon, web) == vip
        assert daemon.vips.stats.reconciles == 1
        for container in replicas:
            await off_loop(container.restart, timeout=5)
        await until(
            daemon.registry,
            lambda s: {ep.address for ep in s.ready.get(web, ())} == {ip_of(c) for c in replicas},
            30,
        )
        await served(daemon, vip, "tcp", 80, 2)
        assert vip_of(daemon, web) == vip
        assert {await off_loop(http_get, vip, 80) for _ in range(20)} == {
            c.id[:12] for c in replicas
        }
    # Turning VIPs off removes the table; the allocation stays for next time.
    async with running(daemon_config(tmp_path, enabled=False)):
        pass
    with pytest.raises(RuntimeError):
        nft("list", "table", "ip", "stablenet")
    assert json.loads((tmp_path / "vips.json").read_text())["services"][web] == vip


async def test_no_ready_endpoint_is_refused_at_once(containers: Containers, tmp_path: Path) -> None:
    web = containers.name("gone")
    only = await off_loop(containers.run, "only", web_labels(web), command=HTTPD)
    async with running(daemon_config(tmp_path)) as daemon:
        vip = vip_of(daemon, web)
        await served(daemon, vip, "tcp", 80, 1)
        await off_loop(only.stop, timeout=5)
        await served(daemon, vip, "tcp", 80, 0)
        assert vip in daemon.vips.table.vips
        began = time.monotonic()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((vip, 80), timeout=3)
        assert time.monotonic() - began < 1
    assert guard_drops() == 0


async def test_proxy_mode_serves_the_address_from_the_proxy(
    containers: Containers, tmp_path: Path
) -> None:
    web = containers.name("pmode")
    await off_loop(containers.run, "p1", web_labels(web, **{"stablenet.vip.mode": "proxy"}))
    async with running(daemon_config(tmp_path)) as daemon:
        vip = vip_of(daemon, web)
        assert daemon.proxy is not None
        await daemon.proxy.sync_listeners()  # the listeners the virtual addresses declared
        assert (vip, 80) in daemon.proxy.bound
        assert vip not in daemon.vips.table.vips  # not the kernel's
        route = await off_loop(
            lambda: (
                __import__("subprocess")
                .run(["ip", "route", "get", vip], capture_output=True, text=True, check=True)
                .stdout
            )
        )
        assert route.startswith("local ")
        assert await off_loop(http_get, vip, 80)
        assert daemon.vips.info(web) == {"address": vip, "path": "proxy", "ports": ["http/80"]}


async def test_a_range_that_overlaps_a_docker_network_is_refused(tmp_path: Path) -> None:
    cfg = daemon_config(tmp_path, vip_range="172.17.0.0/24")
    with pytest.raises(StartupError, match=r"vips\.range: '172\.17\.0\.0/24' overlaps"):
        async with running(cfg):
            pass
    assert rules.TABLE == "ip stablenet"
