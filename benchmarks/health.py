"""Health checking cost and reaction time, on loopback.

* CPU: N endpoints (default 1,000) with an HTTP (or TCP) check every 1 s against a backend in
  another process (the host's nginx when installed, else a small asyncio server), for D
  seconds. Reports the checker process's CPU as a share of one core, and checks per second.
* Reaction: one endpoint, interval 1 s, fall 2; its backend starts failing at T; reports the time
  from T until the registry stops routing to it (active detection), and the time from T until
  passive reports (one failed request every 10 ms) eject it.

    .venv/bin/python -m benchmarks.health --endpoints 1000 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.processes import cpu_seconds, stop
from stablenet.config import HealthConfig
from stablenet.health.checker import HealthChecker
from stablenet.model import Endpoint, HealthSpec, State, Upsert
from stablenet.registry import Registry
from tests.helpers import free_port

RESULTS = Path(__file__).resolve().parent / "results"
NGINX_CONF = """
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
daemon off;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "ok"; }}
    }}
}}
"""
PY_SERVER = """
import asyncio, sys
async def handle(r, w):
    try:
        await r.readuntil(b"\\r\\n\\r\\n")
        w.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\nConnection: close\\r\\n\\r\\nok")
        await w.drain()
    except Exception:
        pass
    w.close()
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]), backlog=4096)
    await server.serve_forever()
asyncio.run(main())
"""


def start_backend(port: int, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if Path(nginx).exists():
        conf = workdir / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=workdir, port=port))
        proc = subprocess.Popen([nginx, "-c", str(conf), "-e", str(workdir / "error.log")])
        return proc, "nginx"
    script = workdir / "server.py"
    script.write_text(PY_SERVER)
    return subprocess.Popen(["python3", str(script), str(port)]), "python asyncio"


async def wait_listening(port: int) -> None:
    async with asyncio.timeout(10):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                return
            except OSError:
                await asyncio.sleep(0.05)


def endpoint(i: int, port: int, spec: HealthSpec | None) -> Endpoint:
    return Endpoint(
        id=f"bench{i:06d}",
        name=f"bench-{i}",
        service=f"svc{i % 50}",
        address="127.0.0.1",
        port=port,
        network="lo",
        addresses=("127.0.0.1",),
        check=spec,
    )


async def cpu_cost(count: int, seconds: float, port: int, http: bool) -> dict[str, Any]:
    registry = Registry()
    spec = HealthSpec("/healthz" if http else None, interval=1.0, timeout=1.0, rise=1, fall=3)
    checker = HealthChecker(registry, HealthConfig())
    task = asyncio.get_running_loop().create_task(checker.run())
    registry.apply([Upsert(endpoint(i, port, spec)) for i in range(count)])
    async with asyncio.timeout(60):
        await registry.until(lambda s: sum(len(v) for v in s.ready.values()) == count)
    checks0, cpu0, wall0 = checker.checks, time.process_time(), time.monotonic()
    await asyncio.sleep(seconds)  # the measurement window itself
    checks, cpu, wall = (
        checker.checks - checks0,
        time.process_time() - cpu0,
        time.monotonic() - wall0,
    )
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return {
        "kind": "http" if http else "tcp",
        "endpoints": count,
        "checks_per_s": round(checks / wall, 1),
        "cpu_share_of_one_core": round(cpu / wall, 3),
        "cpu_us_per_check": round(cpu / max(checks, 1) * 1e6, 1),
    }


async def haproxy_cost(count: int, seconds: float, port: int, workdir: Path) -> dict[str, Any]:
    """The same checks done by HAProxy (1,000 servers, `check inter 1s`), for comparison."""
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        return {
            "kind": "haproxy http",
            "skipped": "haproxy not installed (apt-get install haproxy)",
        }
    servers = "\n".join(f"    server s{i} 127.0.0.1:{port} check inter 1s" for i in range(count))
    conf = workdir / "haproxy.cfg"
    conf.write_text(
        "global\n    maxconn 8192\n    nbthread 1\n"
        "defaults\n    mode http\n    timeout connect 1s\n    timeout client 5s\n"
        "    timeout server 5s\n"
        f"frontend fe\n    bind 127.0.0.1:{free_port()}\n    default_backend be\n"
        f"backend be\n    option httpchk GET /healthz\n{servers}\n"
    )
    proc = subprocess.Popen([haproxy, "-f", str(conf), "-db"], stdout=subprocess.DEVNULL)  # noqa: ASYNC220
    try:
        await asyncio.sleep(3)  # let every server pass its first check
        if proc.poll() is not None:
            raise RuntimeError(f"haproxy exited with {proc.returncode}; config {conf}")
        cpu0, wall0 = cpu_seconds(proc.pid), time.monotonic()
        await asyncio.sleep(seconds)
        cpu, wall = cpu_seconds(proc.pid) - cpu0, time.monotonic() - wall0
    finally:
        stop(proc)
    return {
        "kind": "haproxy http",
        "endpoints": count,
        "checks_per_s": float(count),
        "cpu_share_of_one_core": round(cpu / wall, 3),
        "cpu_us_per_check": round(cpu / wall / count * 1e6, 1),
    }


async def reaction(port_ok: int) -> dict[str, Any]:
    """Active: a backend of our own that starts answering 503 at T."""
    failing = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            status = b"503 Service Unavailable" if failing.is_set() else b"200 OK"
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    registry = Registry()
    checker = HealthChecker(registry, HealthConfig(eject_after=5))
    task = asyncio.get_running_loop().create_task(checker.run())
    spec = HealthSpec("/", interval=1.0, timeout=0.5, rise=1, fall=2)
    registry.apply([Upsert(endpoint(1, port, spec)), Upsert(endpoint(2, port_ok, None))])
    async with asyncio.timeout(10):
        await registry.until(lambda s: s.endpoints["bench000001"].state is State.READY)
    await asyncio.sleep(0.3)  # start the failure at an arbitrary point of the check cycle
    t0 = time.monotonic()
    failing.set()
    async with asyncio.timeout(10):
        await registry.until(lambda s: s.endpoints["bench000001"].state is not State.READY)
    active = time.monotonic() - t0
    # Passive: requests to endpoint 2 fail every 10 ms from T.
    ep2 = registry.snapshot.endpoints["bench000002"]
    t0 = time.monotonic()
    while registry.snapshot.endpoints["bench000002"].state is State.READY:
        await asyncio.sleep(0.01)  # one failed request every 10 ms
        checker.report(ep2.id, ep2.address, ok=False, reason="connection refused")
    passive = time.monotonic() - t0
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    server.close()
    await server.wait_closed()
    return {
        "active_s": round(active, 3),
        "active_bound_s": "fall x interval = 2 x 1 s (+ timeout for hangs)",
        "passive_s": round(passive, 3),
        "passive_bound": "eject_after (5) failed requests",
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoints", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        backend, kind = start_backend(port, Path(tmp))
        try:
            await wait_listening(port)
            http = await cpu_cost(args.endpoints, args.seconds, port, http=True)
            tcp = await cpu_cost(args.endpoints, args.seconds, port, http=False)
            peer = await haproxy_cost(args.endpoints, args.seconds, port, Path(tmp))
            react = await reaction(port)
        finally:
            stop(backend)
    for row in (http, tcp, peer):
        if "skipped" in row:
            print(f"{row['kind']}: {row['skipped']}")
            continue
        print(
            f"{row['endpoints']} endpoints, {row['kind']} check every 1 s (backend {kind}): "
            f"{row['checks_per_s']} checks/s, {row['cpu_share_of_one_core'] * 100:.1f}% of one "
            f"core, {row['cpu_us_per_check']} us CPU per check"
        )
    print(
        f"backend goes bad -> not routed: active {react['active_s']} s "
        f"({react['active_bound_s']}), passive {react['passive_s']} s "
        f"({react['passive_bound']} at 100 failed requests/s)"
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "health.json").write_text(
        json.dumps({"http": http, "tcp": tcp, "haproxy": peer, "reaction": react}, indent=2)
    )


if __name__ == "__main__":
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:  # as the daemon runs
        runner.run(main())
