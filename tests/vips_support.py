"""Support for the virtual address tests and benchmarks: the guard that keeps the test range
from leaving the machine, a daemon run in process, and backends that name themselves."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from stablenet import config
from stablenet.daemon import Daemon
from tests.helpers import free_port

TEST_RANGE = "198.18.0.0/15"  # reserved for benchmarking (RFC 2544): no real network uses it
VIP_RANGE = "198.18.0.0/24"  # what the daemon under test allocates from
GUARD = "ip snt_vips_guard"

_GUARD_RULES = f"""
add table {GUARD}
add chain {GUARD} output {{ type filter hook output priority 10; policy accept; }}
add chain {GUARD} forward {{ type filter hook forward priority 10; policy accept; }}
add rule {GUARD} output ip daddr {TEST_RANGE} oifname != "lo" counter drop
add rule {GUARD} forward ip daddr {TEST_RANGE} counter drop
"""


def nft(*args: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        ["nft", *args], input=stdin, capture_output=True, text=True, timeout=30, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"nft {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


@contextlib.contextmanager
def guard() -> Iterator[None]:
    """Drop anything to the test range that leaves by a real interface (after NAT: translated
    packets no longer match). Raises, and so stops the caller, unless the guard is listed."""
    with contextlib.suppress(RuntimeError):
        nft("delete", "table", *GUARD.split())
    nft("-f", "-", stdin=_GUARD_RULES)
    listed = nft("list", "table", *GUARD.split())
    if f"ip daddr {TEST_RANGE}" not in listed or "drop" not in listed:
        raise RuntimeError(f"the guard table is not in place; refusing to send to {TEST_RANGE}")
    try:
        yield
    finally:
        nft("delete", "table", *GUARD.split())


def guard_drops() -> int:
    """Packets the guard dropped (each one would have left the machine)."""
    listed = nft("list", "table", *GUARD.split())
    return sum(
        int(line.split("packets")[1].split()[0])
        for line in listed.splitlines()
        if "packets" in line
    )


def daemon_config(state_dir: Path, vip_range: str = VIP_RANGE, enabled: bool = True) -> Any:
    text = f"""
[dns]
listen = ["127.0.0.1:{free_port()}"]
[proxy]
listen = "127.0.0.1:{free_port()}"
[admin]
listen = "127.0.0.1:{free_port()}"
[docker]
exposed_by_default = false
[controller]
enabled = false
state_dir = "{state_dir}"
[vips]
enabled = {"true" if enabled else "false"}
range = "{vip_range}"
"""
    return config.parse(text, env={})


@contextlib.asynccontextmanager
async def running(cfg: Any, within: float = 30) -> AsyncIterator[Any]:
    """A daemon running in this loop; with VIPs on, yielded once its first reconcile is done."""
    daemon = Daemon(cfg)
    task = asyncio.get_running_loop().create_task(daemon.run(), name="test-daemon")
    try:
        async with asyncio.timeout(within):
            if daemon.vips is not None:
                ready = asyncio.get_running_loop().create_task(daemon.vips.ready.wait())
                done, _ = await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
                if task in done:
                    ready.cancel()
                    task.result()  # raises what stopped it
            else:
                await asyncio.sleep(0)
        yield daemon
    finally:
        daemon.stopping.set()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(30):
                await task


PY_MOUNTS = {
    path: {"bind": path, "mode": "ro"}
    for path in ("/usr/bin/python3.11", "/lib", "/lib64", "/usr/lib")
}
UDP_NAMER = (
    "import socket\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "s.bind(('0.0.0.0', 5353))\n"
    "name = socket.gethostname().encode()\n"
    "while True:\n"
    "    data, peer = s.recvfrom(512)\n"
    "    s.sendto(name, peer)\n"
)
# httpd that finishes what it serves: on SIGTERM it gets one more second (the endpoint is out
# of every map by then), as a real server drains.
GRACEFUL_HTTPD = [
    "sh",
    "-c",
    'httpd -f -p 80 -h /www & pid=$!; trap "sleep 1; kill $pid; exit 0" TERM; wait $pid',
]
