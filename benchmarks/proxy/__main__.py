"""Proxy benchmark: wrk through stablenet, nginx, HAProxy and Caddy in front of the same nginx
backend, plus direct to the backend and through ``floor`` (the same data path with no features,
see floor.py), in one run. Each proxy is pinned to CPU 0; wrk and the
backend share CPU 1. Every case runs ``--repeat`` times; the run with the median req/s is
reported, with p50/p99 latency from wrk and the proxy's CPU time per request (user + system of
its process, from /proc). Traffic stays on 127.0.0.1.

    bash benchmarks/proxy/run.sh                # installs missing peers, then runs this
    .venv/bin/python -m benchmarks.proxy --duration 8 --repeat 3
    .venv/bin/python -m benchmarks.proxy --targets stablenet,stablenet-w2,nginx,nginx-w2

A target with ``-w2`` runs two processes (stablenet's proxy.workers, nginx's worker_processes)
pinned to every CPU instead of CPU 0 alone.

Prints a table and writes JSON to benchmarks/results/proxy.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.processes import cpu_seconds, stop

RESULTS = Path(__file__).resolve().parents[1] / "results"
HOST = "web.stablenet.internal"
PROXY_CPU = "0"
LOAD_CPU = "1"
SIZES = {"small": "/small", "16k": "/16k"}

BACKEND_CONF = """
worker_processes 1;
daemon off;
pid {dir}/backend.pid;
error_log {dir}/backend.err warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    client_body_temp_path {dir}/tmp;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /small {{ default_type text/plain; return 200 "ok"; }}
        location = /16k {{ root {dir}/www; try_files /16k =404; }}
    }}
}}
"""

NGINX_PROXY_CONF = """
worker_processes {workers};
daemon off;
pid {dir}/nginx-proxy.pid;
error_log {dir}/nginx-proxy.err warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {dir}/tmp;
    proxy_temp_path {dir}/tmp;
    upstream web {{ server 127.0.0.1:{backend}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://web;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $host;
        }}
    }}
}}
"""

HAPROXY_CONF = """
global
    nbthread 1
    maxconn 4096
defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    option http-keep-alive
    option forwardfor
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    http-reuse always
    server s1 127.0.0.1:{backend}
"""

CADDYFILE = """
{{
    admin off
    auto_https off
}}
http://:{port} {{
    bind 127.0.0.1
    reverse_proxy 127.0.0.1:{backend}
}}
"""


@dataclass
class Run:
    target: str
    size: str
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    cpu_us_per_req: float | None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, deadline: float = 10.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


@contextlib.contextmanager
def process(
    argv: list[str], cpu: str, log: Path, env: dict[str, str] | None = None
) -> Iterator[int]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            ["taskset", "-c", cpu, *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    try:
        yield proc.pid
    finally:
        stop(proc)


def parse_ms(text: str) -> float:
    match = re.match(r"([\d.]+)(us|ms|s)", text)
    if match is None:
        raise ValueError(text)
    value, unit = float(match.group(1)), match.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def wrk(
    port: int, path: str, duration: int, connections: int
) -> tuple[float, float, float, int, int]:
    out = subprocess.run(
        [
            "taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{connections}", f"-d{duration}s",
            "--latency", "-H", f"Host: {HOST}", f"http://127.0.0.1:{port}{path}",
        ],
        capture_output=True, text=True, check=True, timeout=duration + 30,
    ).stdout  # fmt: skip
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = parse_ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = parse_ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = 0
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        errors += int(non2xx.group(1))
    sock_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    if sock_errors:
        errors += sum(int(g) for g in sock_errors.groups())
    return rps, p50, p99, total, errors


def measure(target: str, port: int, pid: int | None, size: str, args: argparse.Namespace) -> Run:
    wrk(port, SIZES[size], 1, args.connections)  # warm up pools and caches
    runs = []
    for _ in range(args.repeat):
        before = cpu_seconds(pid) if pid else 0.0
        rps, p50, p99, total, errors = wrk(port, SIZES[size], args.duration, args.connections)
        cpu = (cpu_seconds(pid) - before) / total * 1e6 if pid and total else None
        runs.append(Run(target, size, rps, p50, p99, total, errors, cpu))
    runs.sort(key=lambda r: r.rps)
    median = runs[len(runs) // 2]
    print(
        f"  {target:<10} {size:<6} {median.rps:>9.0f} req/s  p50 {median.p50_ms:6.2f} ms  "
        f"p99 {median.p99_ms:6.2f} ms  cpu/req "
        + (f"{median.cpu_us_per_req:5.1f} us" if median.cpu_us_per_req else "   n/a")
        + f"  (runs: {', '.join(f'{r.rps:.0f}' for r in runs)})"
        + (
            f"  FAILED REQUESTS: {sum(r.errors for r in runs)}"
            if any(r.errors for r in runs)
            else ""
        ),
        flush=True,
    )
    return median


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk run")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument(
        "--targets",
        default="direct,stablenet,floor,nginx,haproxy,caddy",
        help="comma-separated; floor is the feature-less Protocols + httptools proxy",
    )
    args = parser.parse_args()
    # A TERM stops the run cleanly: the backend and proxies started here are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    for tool in ("wrk", "nginx", "haproxy", "caddy", "taskset"):
        if shutil.which(tool) is None:
            print(f"{tool} is missing: run bash benchmarks/proxy/run.sh", file=sys.stderr)
            return 2
    work = Path(tempfile.mkdtemp(prefix="stablenet-bench-proxy-"))
    work.chmod(0o755)  # nginx's workers (user nobody) serve /16k from here: mkdtemp makes it 0700
    (work / "tmp").mkdir()
    (work / "www").mkdir()
    (work / "www" / "16k").write_bytes(b"x" * 16384)
    backend = free_port()
    results: list[Run] = []
    try:
        conf = work / "backend.conf"
        conf.write_text(BACKEND_CONF.format(dir=work, port=backend))
        with process(["nginx", "-c", str(conf), "-p", str(work)], LOAD_CPU, work / "backend.log"):
            wait_port(backend)
            print(f"backend nginx on 127.0.0.1:{backend}; proxies on CPU {PROXY_CPU}", flush=True)
            for target in args.targets.split(","):
                results += run_target(target, backend, work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(results, args)
    return 0


def run_target(target: str, backend: int, work: Path, args: argparse.Namespace) -> list[Run]:
    if target == "direct":
        return [measure("direct", backend, None, size, args) for size in SIZES]
    port = free_port()
    env: dict[str, str] = {}
    # "-w2" on a target: two processes (stablenet's proxy.workers, nginx's worker_processes),
    # pinned to both CPUs instead of CPU 0 alone.
    name, _, suffix = target.partition("-w")
    workers = int(suffix) if suffix.isdigit() else 1
    cpus = PROXY_CPU if workers == 1 else ",".join(str(cpu) for cpu in range(os.cpu_count() or 1))
    if workers > 1:
        target = name
    if target in ("stablenet", "stablenet-nometrics", "stablenet-pure"):
        argv = [
            sys.executable, "-m", "benchmarks.proxy.serve_stablenet",
            "--listen", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{backend}",
        ]  # fmt: skip
        if target == "stablenet-nometrics":
            argv.append("--no-metrics")
        argv += ["--workers", str(workers)]
        if target == "stablenet-pure":
            env = {"STABLENET_PURE": "1"}  # the request path as Python, not compiled
    elif target == "floor":
        argv = [
            sys.executable, "-m", "benchmarks.proxy.floor",
            "--listen", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{backend}",
        ]  # fmt: skip
    elif target == "nginx":
        conf = work / "nginx-proxy.conf"
        conf.write_text(
            NGINX_PROXY_CONF.format(dir=work, port=port, backend=backend, workers=workers)
        )
        argv = ["nginx", "-c", str(conf), "-p", str(work)]
    elif target == "haproxy":
        conf = work / "haproxy.cfg"
        conf.write_text(HAPROXY_CONF.format(port=port, backend=backend))
        argv = ["haproxy", "-db", "-f", str(conf)]
    elif target == "caddy":
        conf = work / "Caddyfile"
        conf.write_text(CADDYFILE.format(port=port, backend=backend))
        argv = ["caddy", "run", "--adapter", "caddyfile", "--config", str(conf)]
        env = {"GOMAXPROCS": "1", "HOME": str(work), "XDG_DATA_HOME": str(work)}
    else:
        raise SystemExit(f"unknown target {target!r}")
    label = f"{target}-w{workers}" if workers > 1 else target
    with process(argv, cpus, work / f"{label}.log", env) as pid:
        wait_port(port)
        return [measure(label, port, pid, size, args) for size in SIZES]


def report(results: list[Run], args: argparse.Namespace) -> None:
    by = {(r.target, r.size): r for r in results}
    print()
    print(
        f"{'target':<20} {'size':<6} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'cpu us/req':>10} "
        f"{'x nginx':>8} {'p99/nginx':>9}"
    )
    for r in results:
        ref = by.get(("nginx", r.size))
        ratio = f"{r.rps / ref.rps:8.2f}" if ref else f"{'':>8}"
        p99 = f"{r.p99_ms / ref.p99_ms:9.2f}" if ref and ref.p99_ms else f"{'':>9}"
        cpu = f"{r.cpu_us_per_req:10.1f}" if r.cpu_us_per_req else f"{'n/a':>10}"
        print(
            f"{r.target:<20} {r.size:<6} {r.rps:9.0f} {r.p50_ms:7.2f} {r.p99_ms:7.2f} {cpu} "
            f"{ratio} {p99}"
        )
    for size in SIZES:
        ours = by.get(("stablenet", size))
        if ours is None:
            continue
        parts = []
        for peer in ("nginx", "haproxy", "caddy", "floor"):
            ref = by.get((peer, size))
            if ref:
                parts.append(f"{ours.rps / ref.rps:.2f}x {peer}")
        print(f"stablenet {size}: " + ", ".join(parts))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "proxy.json"
    out.write_text(
        json.dumps(
            {
                "duration_s": args.duration,
                "repeat": args.repeat,
                "connections": args.connections,
                "cpus": {"proxy": PROXY_CPU, "wrk_and_backend": LOAD_CPU},
                "runs": [asdict(r) for r in results],
            },
            indent=2,
        )
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    raise SystemExit(main())
