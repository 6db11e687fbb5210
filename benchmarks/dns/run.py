"""DNS benchmark: stablenet against dnsmasq with dnsperf, on loopback only.

Both servers answer the same 1,000 registry names (stablenet from its registry, dnsmasq from a
hosts file with the same addresses), and the same 1,000 forwarded names: an origin dnsmasq holds
fwd-N.bench.test, both servers forward there and cache (caches warmed by one pass first). Each
server is pinned to CPU 0 with taskset, dnsperf to CPU 1; every (set, server) pair runs --repeat
times, interleaved. Reports queries per second, average latency and loss, and the ratio of
stablenet's median qps to dnsmasq's.

    bash benchmarks/dns/run.sh                     # installs dnsperf/dnsmasq when missing
    .venv/bin/python -m benchmarks.dns.run --seconds 10 --repeat 3

Writes benchmarks/results/dns.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.dns.serve import names
from benchmarks.processes import stop
from tests.helpers import free_port

ZONE = "stablenet.internal"
RESULTS = Path(__file__).resolve().parents[1] / "results" / "dns.json"
SERVER_CPU = "0"
LOAD_CPU = "1"


@contextmanager
def process(argv: list[str], ready: str | None = None) -> Iterator[subprocess.Popen[str]]:
    """Start a process, optionally wait for a line on its stdout, stop it by its PID."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        if ready is not None:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if ready not in line:
                raise RuntimeError(f"{argv[0]} did not start: {line!r}")
        yield proc
    finally:
        stop(proc)
        if proc.stdout is not None:
            proc.stdout.close()


def dnsmasq(port: int, extra: list[str]) -> list[str]:
    return [
        "taskset",
        "-c",
        SERVER_CPU,
        shutil.which("dnsmasq") or "/usr/sbin/dnsmasq",
        "--no-daemon",
        "--conf-file=/dev/null",
        f"--port={port}",
        "--listen-address=127.0.0.1",
        "--bind-interfaces",
        "--no-resolv",
        "--no-hosts",
        "--user=root",
        "--cache-size=10000",
        "--dns-forward-max=1000",
        *extra,
    ]


def wait_answers(port: int, name: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        out = subprocess.run(
            ["dig", "@127.0.0.1", "-p", str(port), name, "+short", "+time=1", "+tries=1"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        if out:
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing answers {name} on port {port}")


def dnsperf(port: int, queries: Path, seconds: float, once: bool = False) -> dict[str, float]:
    argv = ["taskset", "-c", LOAD_CPU, "dnsperf", "-s", "127.0.0.1", "-p", str(port)]
    argv += ["-d", str(queries), "-c", "4", "-q", "100", "-t", "2"]
    argv += ["-n", "1"] if once else ["-l", str(seconds)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60).stdout

    def grab(label: str) -> float:
        match = re.search(rf"{label}:\s+([\d.]+)", out)
        if match is None:
            raise RuntimeError(f"dnsperf output lacks {label!r}:\n{out}")
        return float(match.group(1))

    return {
        "qps": grab("Queries per second"),
        "sent": grab("Queries sent"),
        "lost": grab("Queries lost"),
        "latency_ms": grab(r"Average Latency \(s\)") * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--names", type=int, default=1000)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="stablenet-dnsbench-"))
    zone_names = names(args.names)
    (work / "zone.hosts").write_text(
        "".join(f"{ip} {name}.{ZONE}\n" for name, ip in zone_names), encoding="ascii"
    )
    (work / "origin.hosts").write_text(
        "".join(f"{ip} fwd-{i}.bench.test\n" for i, (_, ip) in enumerate(zone_names)),
        encoding="ascii",
    )
    sets = {
        "registry": work / "zone.txt",
        "forwarded-cached": work / "fwd.txt",
    }
    sets["registry"].write_text("".join(f"{name}.{ZONE} A\n" for name, _ in zone_names))
    sets["forwarded-cached"].write_text(
        "".join(f"fwd-{i}.bench.test A\n" for i in range(args.names))
    )
    origin_port, peer_port, ours_port = free_port(), free_port(), free_port()
    origin = dnsmasq(origin_port, [f"--addn-hosts={work / 'origin.hosts'}", "--local-ttl=3600"])
    origin[2] = LOAD_CPU  # only busy while caches warm up
    peer = dnsmasq(
        peer_port,
        [
            f"--addn-hosts={work / 'zone.hosts'}",
            "--local-ttl=5",
            f"--server=127.0.0.1#{origin_port}",
        ],
    )
    ours = [
        "taskset",
        "-c",
        SERVER_CPU,
        sys.executable,
        "-m",
        "benchmarks.dns.serve",
        "--port",
        str(ours_port),
        "--names",
        str(args.names),
        "--upstream",
        f"127.0.0.1:{origin_port}",
    ]
    servers = {"dnsmasq": peer_port, "stablenet": ours_port}
    runs: dict[str, dict[str, list[dict[str, float]]]] = {
        s: {name: [] for name in servers} for s in sets
    }
    with process(origin), process(peer), process(ours, ready="ready") as ours_proc:
        for port in (origin_port, peer_port):
            wait_answers(port, "fwd-1.bench.test")
        for port in servers.values():  # fill the forwarding caches
            dnsperf(port, sets["forwarded-cached"], 30, once=True)
            dnsperf(port, sets["registry"], 30, once=True)
        for rep in range(args.repeat):
            for set_name, queries in sets.items():
                for server, port in servers.items():
                    result = dnsperf(port, queries, args.seconds)
                    runs[set_name][server].append(result)
                    print(
                        f"rep {rep + 1} {set_name:17} {server:9} {result['qps']:>9.0f} qps "
                        f"{result['latency_ms']:.3f} ms lost {result['lost']:.0f}",
                        flush=True,
                    )
        os.kill(ours_proc.pid, signal.SIGTERM)
        assert ours_proc.stdout is not None
        stats_line = ours_proc.stdout.readline().strip()
    shutil.rmtree(work, ignore_errors=True)

    report: dict[str, Any] = {
        "seconds": args.seconds,
        "repeat": args.repeat,
        "names": args.names,
        "stablenet_stats": stats_line,
        "sets": {},
    }
    print()
    print(
        f"{'set':17} {'server':9} {'median qps':>10} {'best qps':>9} {'avg ms':>7} {'lost':>5} "
        f"{'ratio (median/best)':>20}"
    )
    for set_name in sets:
        medians = {s: statistics.median(r["qps"] for r in runs[set_name][s]) for s in servers}
        best = {s: max(r["qps"] for r in runs[set_name][s]) for s in servers}
        ratio = medians["stablenet"] / medians["dnsmasq"]
        best_ratio = best["stablenet"] / best["dnsmasq"]
        # Runs are interleaved, so a pair of neighbouring runs saw similar background load.
        pairs = [
            ours["qps"] / theirs["qps"]
            for ours, theirs in zip(
                runs[set_name]["stablenet"], runs[set_name]["dnsmasq"], strict=True
            )
        ]
        entry: dict[str, Any] = {
            "ratio_of_medians": round(ratio, 3),
            "ratio_of_best": round(best_ratio, 3),
            "pairwise_ratios": [round(x, 3) for x in pairs],
        }
        for server in servers:
            rs = runs[set_name][server]
            latency = statistics.median(r["latency_ms"] for r in rs)
            lost = sum(r["lost"] for r in rs)
            entry[server] = {
                "median_qps": round(medians[server]),
                "best_qps": round(best[server]),
                "qps": [round(r["qps"]) for r in rs],
                "median_latency_ms": round(latency, 3),
                "lost": int(lost),
                "sent": int(sum(r["sent"] for r in rs)),
            }
            shown = f"{ratio:.2f}x / {best_ratio:.2f}x" if server == "stablenet" else ""
            print(
                f"{set_name:17} {server:9} {medians[server]:>10.0f} {best[server]:>9.0f} "
                f"{latency:>7.3f} {lost:>5.0f} {shown:>20}"
            )
        report["sets"][set_name] = entry
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    main()
