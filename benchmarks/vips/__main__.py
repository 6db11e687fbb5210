"""Virtual addresses: the data path and the control plane, in one run.

Data path (request rate and CPU per request, keep-alive and one connection per request, wrk on
the host): the kernel path (nftables DNAT on a service's virtual address), stablenet's proxy
serving another service's virtual address (stablenet.vip.mode=proxy), nginx as an HTTP proxy and
as a TCP (stream) proxy on loopback, and the backend directly. The backends are nginx containers
answering their host name. Spread: 2,000 connections through the kernel path, counted per
backend. Control plane: benchmarks/vips/updates.py in a network namespace of its own.

Safety: the guard table (tests/vips_support.py) is installed and checked before anything is
sent to the test range, and stays until the end. Every load run is bounded in time.

    bash benchmarks/vips/run.sh              # or: .venv/bin/python -m benchmarks.vips
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker

from benchmarks.processes import cpu_seconds, stop
from tests.helpers import Containers, ensure_image, free_port, ip_of
from tests.vips_support import VIP_RANGE, guard, guard_drops, nft

BACKEND_CONF = """
user root;
worker_processes 1;
daemon off;
pid /tmp/nginx.pid;
error_log stderr error;
events { worker_connections 8192; }
http {
    access_log off;
    client_body_temp_path /tmp/body; proxy_temp_path /tmp/proxy;
    fastcgi_temp_path /tmp/fcgi; uwsgi_temp_path /tmp/uwsgi; scgi_temp_path /tmp/scgi;
    keepalive_requests 1000000;
    server { listen 80 reuseport backlog=4096; location / { return 200 "$hostname\\n"; } }
}
"""
PROXY_CONF = """
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log stderr error;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {work}/body; proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fcgi; uwsgi_temp_path {work}/uwsgi; scgi_temp_path {work}/scgi;
    keepalive_requests 1000000;
    upstream b {{ server {backend}:80; keepalive 128; }}
    server {{ listen 127.0.0.1:{http}; location / {{ proxy_pass http://b;
        proxy_http_version 1.1; proxy_set_header Connection ""; }} }}
}}
stream {{ server {{ listen 127.0.0.1:{tcp}; proxy_pass {backend}:80; }} }}
"""
MOUNTS = {p: {"bind": p, "mode": "ro"} for p in ("/usr/sbin/nginx", "/lib", "/lib64", "/usr/lib")}


def backend(containers: Containers, name: str, service: str, mode: str, conf: Path) -> Any:
    labels = {
        "stablenet.enable": "true",
        "stablenet.service": service,
        "stablenet.port": "80",
        "stablenet.vip.mode": mode,
    }
    volumes = {**MOUNTS, str(conf): {"bind": "/etc/bench.conf", "mode": "ro"}}
    return containers.run(
        name, labels, command=["/usr/sbin/nginx", "-c", "/etc/bench.conf"], volumes=volumes
    )


def machine_busy() -> float:
    """CPU seconds the whole machine spent busy (all cores, softirq included)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wrk(url: str, seconds: int, close: bool, proxy_pid: int | None) -> dict[str, Any]:
    args = ["wrk", "-t2", "-c64", f"-d{seconds}s", "--latency", url]
    if close:
        args[1:1] = ["-H", "Connection: close"]
    busy0, proxy0 = machine_busy(), cpu_seconds(proxy_pid) if proxy_pid else 0.0
    out = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 30).stdout
    busy1, proxy1 = machine_busy(), cpu_seconds(proxy_pid) if proxy_pid else 0.0
    done = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Socket errors: (.*)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    p99 = re.search(r"99%\s+(\S+)", out)
    return {
        "rps": done / seconds,
        "machine_us_per_req": (busy1 - busy0) / max(done, 1) * 1e6,
        "proxy_us_per_req": (proxy1 - proxy0) / max(done, 1) * 1e6 if proxy_pid else 0.0,
        "p99": p99.group(1) if p99 else "",
        "errors": (errors.group(1) if errors else "")
        + (f" non2xx {non2xx.group(1)}" if non2xx else ""),
    }


def spread(vip: str, connections: int) -> dict[str, int]:
    """One request per connection, ``connections`` times: who answered."""
    seen: collections.Counter[str] = collections.Counter()
    for _ in range(connections):
        with socket.create_connection((vip, 80), timeout=3) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
        seen[data.rpartition(b"\r\n\r\n")[2].decode().strip()] += 1
    return dict(seen)


@contextlib.contextmanager
def stablenet(work: Path, state: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    admin = f"127.0.0.1:{free_port()}"
    conf = work / "stablenet.toml"
    conf.write_text(
        f'[dns]\nenabled = false\n[proxy]\nlisten = "127.0.0.1:{free_port()}"\n'
        f'[admin]\nlisten = "{admin}"\n[docker]\nexposed_by_default = false\n'
        f'[controller]\nenabled = false\nstate_dir = "{state}"\n'
        f'[vips]\nenabled = true\nrange = "{VIP_RANGE}"\n[log]\nlevel = "warning"\n'
    )
    proc = subprocess.Popen([sys.executable, "-m", "stablenet", "run", "--config", str(conf)])
    try:
        yield proc, admin
    finally:
        stop(proc)


def services(admin: str, want: int, within: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        try:
            with urllib.request.urlopen(f"http://{admin}/v1/services", timeout=2) as r:
                body = json.load(r)
            vips = {s["name"]: s.get("vip") for s in body["services"]}
            ready = [v for v in vips.values() if v and v["ports"]]
            if len(ready) >= want:
                return vips
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("stablenet did not serve the services in time")
        time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=2000)
    args = parser.parse_args()
    client = docker.from_env()
    containers = Containers(client, ensure_image(client), prefix="snt-vipbench")
    results: dict[str, Any] = {"data_path": {}, "spread": {}}
    with tempfile.TemporaryDirectory() as tmp, guard():
        work = Path(tmp)
        conf = work / "backend.conf"
        conf.write_text(BACKEND_CONF)
        try:
            k = [backend(containers, f"k{i}", "bench-kernel", "kernel", conf) for i in range(1, 5)]
            backend(containers, "p1", "bench-proxy", "proxy", conf)
            direct = ip_of(k[0])
            with stablenet(work, work / "state") as (proc, admin):
                vips = services(admin, 2)
                kvip, pvip = vips["bench-kernel"]["address"], vips["bench-proxy"]["address"]
                listed = nft("list", "table", "ip", "stablenet")
                assert f"{kvip} . tcp . 80 : goto pick-4" in listed, listed
                for n in (4,):
                    results["spread"][n] = spread(kvip, args.connections)
                # One backend on each path from here on: stop three of the kernel replicas.
                for c in k[1:]:
                    c.stop(timeout=2)
                deadline = time.monotonic() + 20
                while "goto pick-1" not in nft("list", "table", "ip", "stablenet"):
                    if time.monotonic() > deadline:
                        raise TimeoutError("the kernel path did not shrink to one backend")
                    time.sleep(0.1)
                two = spread(kvip, 20)
                assert len(two) == 1, two
                ports = {"http": free_port(), "tcp": free_port()}
                (work / "proxy.conf").write_text(
                    PROXY_CONF.format(work=work, backend=direct, **ports)
                )
                ngx = subprocess.Popen(["nginx", "-c", str(work / "proxy.conf"), "-e", "stderr"])
                try:
                    time.sleep(0.5)
                    paths = {
                        "direct": (f"http://{direct}/", None),
                        "kernel (nftables DNAT)": (f"http://{kvip}/", None),
                        "stablenet proxy (vip.mode=proxy)": (f"http://{pvip}/", proc.pid),
                        "nginx HTTP proxy": (f"http://127.0.0.1:{ports['http']}/", ngx.pid),
                        "nginx TCP proxy": (f"http://127.0.0.1:{ports['tcp']}/", ngx.pid),
                    }
                    for close in (False, True):
                        for label, (url, pid) in paths.items():
                            run = wrk(url, args.seconds, close, pid)
                            how = "new connection per request" if close else "keep-alive"
                            key = f"{label}, {how}"
                            results["data_path"][key] = run
                            print(key, json.dumps(run), flush=True)
                finally:
                    stop(ngx)
        finally:
            containers.cleanup()
            with contextlib.suppress(RuntimeError):
                nft("delete", "table", "ip", "stablenet")
        results["guard_drops"] = guard_drops()
    for n, seen in results["spread"].items():
        even = args.connections / n
        worst = max(abs(c - even) for c in seen.values()) / even * 100
        print(
            f"spread over {args.connections} connections, {n} backends: {sorted(seen.values())}, "
            f"worst {worst:.1f}% from even"
        )
    print(json.dumps(results))
    out = Path("benchmarks/results")
    out.mkdir(exist_ok=True)
    (out / "vips.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
