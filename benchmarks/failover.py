"""Failover load test: requests through the proxy's fixed virtual address (and DNS lookups from
inside a container) while the service's replicas restart in a loop, against stablenet and, as a
reference, nginx with the replicas' addresses resolved once at start.

    .venv/bin/python -m benchmarks.failover --replicas 2 --restarts 50
    .venv/bin/python -m benchmarks.failover --replicas 1 --restarts 20 --kinds restart,stop-start
    .venv/bin/python -m benchmarks.failover --target nginx --replicas 2 --restarts 50
    .venv/bin/python -m benchmarks.failover --restarts 5 --backend keepalive --work-ms 20
    .venv/bin/python -m benchmarks.failover --replicas 3 --restarts 0 --query-of-death 5

Restart kinds, each repeated --restarts times, one replica at a time, waiting until the service
is whole again before the next: `restart` (docker restart), `stop-start` (docker stop, another
container takes the freed address, docker start: a new IP), `kill` (docker kill while requests
are in flight, then start), `rolling` (a new container comes up, then the old one is removed).

Load: --concurrency clients send GET /cgi-bin/whoami?ID (answered with the serving container's
hostname, so every response names its backend) with --post-share of them POST (not
idempotent: a proxy may not retry those, so their failures are counted apart). A response from a
container that is not a replica of the service counts as a failure (wrong-backend).

Executions are counted at the backends: every request carries a unique id in its query string,
and the CGI appends `ID METHOD HOSTNAME` to one ledger file on a host directory that every
container mounts (one short O_APPEND write per execution) before it answers. An id executed
twice is a duplicate: never allowed for a POST, allowed (an idempotent retry) for a GET. A POST
answered with an error but found in the ledger ran anyway: the client cannot tell.

Backends (--backend): `httpd`, busybox httpd running a CGI per request and closing the
connection after each response, so a proxy never reuses one; `keepalive`, a shell loop behind
busybox nc answering HTTP/1.1 requests one after another on a connection the proxy keeps and
reuses, so a backend that dies with a request on a reused connection is the keep-alive race,
which a proxy must not answer by sending a POST again. --work-ms makes each request work that
long after it is recorded, as a real handler would, so a kill can land between the two.

Query of death (--query-of-death N): N requests for /cgi-bin/qod, one every --qod-every seconds
beside the load; that CGI records its id and kills the process serving its connection, so every
backend it reaches drops the connection before any response byte, as a crash would. Reported:
how many times each one reached a backend, what its client got, and (stablenet) how many
endpoints were ejected meanwhile and how many at once, from the admin API's event log.

DNS (stablenet only): a container using stablenet as its resolver looks the service up in a
loop; an answer naming an address that no replica held at any time during that lookup is stale.

Traffic goes only to loopback, to the virtual address the daemon adds on lo, and to containers
started here. Every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import docker
import docker.errors

from benchmarks.admin import follow_events
from stablenet.docker.networks import engine_networks
from stablenet.proxy import vip
from tests.helpers import HTTPD, ensure_image, free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
SERVICE = "fo-web"
ZONE = "stablenet.internal"
KINDS = ("restart", "stop-start", "kill", "rolling")
VIP = "169.254.100.61"
REQUEST_TIMEOUT = 15.0  # above the hold timeout: a held request is not a client timeout

# What every container serves, mounted over the image's /www/cgi-bin. Each records the request's
# id (its query string) in the ledger before anything else (`echo` is a shell builtin writing its
# line in one call, so concurrent appends do not interleave), then works for $WORK_US.
RECORD = 'echo "$QUERY_STRING $REQUEST_METHOD $HOSTNAME" >> /ledger/executions\n'
WORK = '[ "$WORK_US" -gt 0 ] && usleep "$WORK_US"\n'
SCRIPTS = {
    # Names the serving container, so every response says which backend ran it.
    "whoami": "#!/bin/sh\n"
    + RECORD
    + WORK
    + 'printf "Content-Type: text/plain\\r\\n\\r\\n"\necho "$HOSTNAME"\n',
    # Kills the httpd process holding the connection: it closes before any response byte.
    "qod": "#!/bin/sh\n" + RECORD + "kill -9 $PPID\n",
    # --backend keepalive: one client connection (nc forks one per connection), requests
    # answered one after another on it, as HTTP/1.1 with keep-alive; qod closes it unanswered.
    "keepalive": r"""#!/bin/sh
cr=$(printf '\r')
while read -r REQUEST_METHOD target version; do
    length=0
    while read -r line; do
        line=${line%"$cr"}
        [ -z "$line" ] && break
        case "$line" in [Cc]ontent-[Ll]ength:*) length=${line#*:} ;; esac
    done
    [ "$length" -gt 0 ] && read -r -n "$length" body
    body=healthy
    if [ "$target" != /healthz ]; then
        QUERY_STRING=${target#*\?}
        """
    + RECORD
    + r"""        case "$target" in /cgi-bin/qod*) exit 0 ;; esac
        """
    + WORK
    + r"""        body=$HOSTNAME
    fi
    printf 'HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s\n' \
        $((${#body} + 1)) "$body"
done
""",
}
BACKENDS = {
    # busybox httpd: a process per connection, closed after each response (no keep-alive).
    "httpd": HTTPD,
    # Connections kept alive and reused by the proxy: the keep-alive race can happen.
    "keepalive": ["nc", "-ll", "-p", "80", "-e", "/www/cgi-bin/keepalive"],
}


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))]


@dataclass(slots=True)
class Outcome:
    rid: str  # the request's id: its query string, as the ledger records it
    sent: float  # unix time
    done: float
    method: str
    kind: str  # ok, conn, 5xx, timeout, wrong-backend, other
    status: int = 0
    backend: str = ""


@dataclass
class Ownership:
    """Which replica address was held when: [start, end) intervals per address."""

    spans: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    open: dict[str, tuple[str, float]] = field(default_factory=dict)  # container id -> (ip, t)

    def start(self, cid: str, ip: str, at: float) -> None:
        self.open[cid] = (ip, at)

    def end(self, cid: str, at: float) -> None:
        if cid in self.open:
            ip, began = self.open.pop(cid)
            self.spans.setdefault(ip, []).append((began, at))

    def held_during(self, ip: str, t0: float, t1: float) -> bool:
        for cid_ip, began in self.open.values():
            if cid_ip == ip and began <= t1:
                return True
        return any(b <= t1 and e >= t0 for b, e in self.spans.get(ip, []))


class Ledger:
    """Every execution at the backends: a host directory holding the CGIs and the ledger file,
    mounted into every container, so a restarted or replaced one records into the same file."""

    def __init__(self) -> None:
        self.dir = tempfile.TemporaryDirectory(
            prefix="failover-ledger-", ignore_cleanup_errors=True
        )
        root = Path(self.dir.name)
        (root / "cgi-bin").mkdir()
        (root / "ledger").mkdir()
        for name, text in SCRIPTS.items():
            script = root / "cgi-bin" / name
            script.write_text(text)
            script.chmod(0o755)
        self.file = root / "ledger" / "executions"
        self.volumes = {
            str(root / "cgi-bin"): {"bind": "/www/cgi-bin", "mode": "ro"},
            str(root / "ledger"): {"bind": "/ledger", "mode": "rw"},
        }

    def read(self) -> Executions:
        return parse_ledger(self.file.read_text() if self.file.exists() else "")

    def close(self) -> None:
        self.dir.cleanup()


@dataclass(frozen=True, slots=True)
class Executions:
    hosts: dict[str, list[str]]  # request id -> the hostname of each container that ran it
    garbled: int  # lines that are not `ID METHOD HOSTNAME` (none, if appends are atomic)

    def count(self, rid: str) -> int:
        return len(self.hosts.get(rid, ()))


def parse_ledger(text: str) -> Executions:
    hosts: dict[str, list[str]] = {}
    garbled = 0
    for line in text.splitlines():
        fields = line.split()
        if len(fields) != 3:
            garbled += 1
            continue
        hosts.setdefault(fields[0], []).append(fields[2])
    return Executions(hosts, garbled)


class Replicas:
    """The service's containers, their start events and address ownership, from docker events."""

    def __init__(
        self,
        client: docker.DockerClient,
        image: str,
        prefix: str,
        serve: dict[str, Any],
    ) -> None:
        self.client = client
        self.image = image
        self.prefix = prefix
        self.serve = serve  # command, volumes, environment: the same for replicas and thieves
        self.network = client.networks.create(f"{prefix}-net")
        self.containers: list[Any] = []
        self.created: list[str] = []
        self.starts: list[tuple[float, str]] = []  # (event time, container id)
        self.ownership = Ownership()
        self.ids: set[str] = set()
        self._serial = 0
        self._connected: dict[str, float] = {}  # container id -> when it joined the network
        self._stream = client.api.events(decode=True, filters={"type": ["container", "network"]})
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with contextlib.suppress(Exception):
            for event in self._stream:
                at = event["timeNano"] / 1e9
                action = event.get("Action", "")
                attributes = event["Actor"].get("Attributes", {})
                if event.get("Type") == "network":
                    # A container holds its address from the moment it joins the network,
                    # which is before its start event: the engine may be asked about it then.
                    if action == "connect" and event["Actor"]["ID"] == self.network.id:
                        self._connected[attributes.get("container", "")] = at
                    continue
                if attributes.get("fo.prefix") != self.prefix:
                    continue
                cid = event["Actor"]["ID"]
                if action == "start" and attributes.get("fo.role") == "replica":
                    with contextlib.suppress(docker.errors.APIError):
                        info = self.client.api.inspect_container(cid)
                        ip = info["NetworkSettings"]["Networks"][self.network.name]["IPAddress"]
                        self.ownership.start(cid, ip, self._connected.pop(cid, at))
                        self.starts.append((at, cid))
                elif action == "die":
                    self.ownership.end(cid, at)

    def run(self, role: str = "replica") -> Any:
        self._serial += 1
        labels = {"fo.prefix": self.prefix, "fo.role": role}
        if role == "replica":
            labels |= {
                "stablenet.service": SERVICE,
                "stablenet.port": "80",
                "stablenet.health.path": "/healthz",
                "stablenet.health.interval": "500ms",
                "stablenet.health.timeout": "500ms",
                "stablenet.health.fall": "2",
            }
        box = self.client.containers.run(
            self.image,
            name=f"{self.prefix}-{role}-{self._serial}",
            labels=labels,
            detach=True,
            network=self.network.name,
            **self.serve,
            init=True,  # an init as PID 1 passes SIGTERM on, so httpd stops at once
        )
        cid = str(box.id)
        self.created.append(cid)
        if role == "replica":
            self.containers.append(box)
            self.ids.add(cid[:12])
        return box

    def ip(self, box: Any) -> str:
        box.reload()
        return str(box.attrs["NetworkSettings"]["Networks"][self.network.name]["IPAddress"])

    def close(self) -> None:
        self._stream.close()
        for cid in self.created:
            with contextlib.suppress(docker.errors.NotFound):
                self.client.api.remove_container(cid, force=True)
        with contextlib.suppress(docker.errors.APIError):
            self.network.remove()


# ---------------------------------------------------------------- targets


class Stablenet:
    """The real daemon, started with the CLI, proxy on a virtual address on lo."""

    name = "stablenet"

    def __init__(self, hold_timeout: float, dns_port: int) -> None:
        self.admin_port = free_port()
        self.dns_port = dns_port
        self.hold_timeout = hold_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.events: list[dict[str, Any]] = []
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115
            prefix="stablenet-failover-", suffix=".log", delete=False
        )

    base = f"http://{VIP}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def host(self) -> str:
        return f"{SERVICE}.{ZONE}"

    async def start(self, replicas: Replicas) -> None:
        env = {
            **os.environ,
            "STABLENET_ADMIN_LISTEN": f"127.0.0.1:{self.admin_port}",
            "STABLENET_DNS_LISTEN": f"127.0.0.1:{self.dns_port},docker:{self.dns_port}",
            "STABLENET_PROXY_LISTEN": f"{VIP}:80",
            "STABLENET_PROXY_HOLD_TIMEOUT": f"{self.hold_timeout}s",
            "STABLENET_DNS_TTL": "1s",
        }
        self.proc = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, "-m", "stablenet", "run"],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        await self.wait_whole(replicas, len(replicas.containers))
        # Nothing goes to the virtual address before it is on this machine: the admin API
        # can answer a moment before the proxy has added it and listens on it.
        async with asyncio.timeout(30):
            while True:
                if await vip.is_local(VIP):
                    break
                await asyncio.sleep(0.05)

    async def ready_ips(self, http: aiohttp.ClientSession) -> set[str]:
        try:
            async with http.get(f"{self.admin}/v1/services/{SERVICE}") as r:
                if r.status != 200:
                    return set()
                body = await r.json()
        except aiohttp.ClientError:
            return set()
        return {e["address"] for e in body["endpoints"] if e["state"] == "ready"}

    async def wait_whole(self, replicas: Replicas, count: int, exact: bool = True) -> None:
        """Until the registry routes to exactly the current replicas' addresses (or at least to
        them, when ``exact`` is false: an old replica may still be routed)."""
        async with aiohttp.ClientSession() as http, asyncio.timeout(60):
            while True:
                want = {replicas.ip(b) for b in replicas.containers}
                ready = await self.ready_ips(http)
                if len(want) == count and (ready == want if exact else want <= ready):
                    return
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError("stablenet exited; log: " + self.log.name)
                await asyncio.sleep(0.05)

    async def follow(self, stop: asyncio.Event) -> None:
        """Keep the admin API's recent events until ``stop``."""
        await follow_events(self.admin, self.events, stop)

    async def figures(self) -> dict[str, Any]:
        """What the daemon saw: passive ejections, from its events, and its retries."""
        async with aiohttp.ClientSession() as http, http.get(f"{self.admin}/metrics") as r:
            metrics = await r.text()
        retries = sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("stablenet_proxy_retries_total{") and f'"{SERVICE}"' in line
        )
        return {"ejections": ejections(self.events), "proxy_retries": int(retries)}

    async def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(self.proc.wait, 30)
            self.proc = None


class Nginx:
    """nginx as often configured: upstream addresses resolved once at start."""

    name = "nginx (addresses resolved once)"

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.TemporaryDirectory(prefix="nginx-failover-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    host = f"{SERVICE}.{ZONE}"

    async def start(self, replicas: Replicas) -> None:
        servers = "\n".join(f"    server {replicas.ip(b)}:80;" for b in replicas.containers)
        conf = Path(self.dir.name) / "nginx.conf"
        conf.write_text(
            f"worker_processes 1;\ndaemon off;\npid {self.dir.name}/nginx.pid;\n"
            f"error_log {self.dir.name}/error.log;\nevents {{ worker_connections 1024; }}\n"
            "http {\n access_log off;\n"
            f" upstream web {{\n{servers}\n    keepalive 32;\n }}\n"
            f" server {{\n  listen 127.0.0.1:{self.port};\n"
            "  location / {\n   proxy_pass http://web;\n   proxy_http_version 1.1;\n"
            '   proxy_set_header Connection "";\n   proxy_connect_timeout 2s;\n  }\n }\n}\n'
        )
        self.proc = subprocess.Popen(["nginx", "-c", str(conf), "-e", f"{self.dir.name}/error.log"])  # noqa: ASYNC220
        async with asyncio.timeout(10):
            while True:
                try:
                    _, w = await asyncio.open_connection("127.0.0.1", self.port)
                    w.close()
                    return
                except OSError:
                    await asyncio.sleep(0.05)

    async def wait_whole(self, replicas: Replicas, count: int, exact: bool = True) -> None:
        """nginx learns nothing: wait until the containers themselves answer on their IPs."""
        async with aiohttp.ClientSession() as http, asyncio.timeout(60):
            for box in replicas.containers:
                while True:
                    try:
                        async with http.get(f"http://{replicas.ip(box)}/healthz") as r:
                            if r.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.05)

    async def follow(self, stop: asyncio.Event) -> None:
        """nginx has no event log to keep."""

    async def figures(self) -> dict[str, Any]:
        return {}

    async def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGQUIT)
            await asyncio.to_thread(self.proc.wait, 30)
            self.proc = None
        self.dir.cleanup()


Target = Stablenet | Nginx


# ---------------------------------------------------------------- load


async def send(
    http: aiohttp.ClientSession, target: Target, method: str, cgi: str, rid: str
) -> Outcome:
    """One request for /cgi-bin/CGI?RID, classified as the client saw it."""
    sent = time.time()
    try:
        async with http.request(
            method,
            f"{target.base}/cgi-bin/{cgi}?{rid}",
            headers={"Host": target.host},
            data=b"x=1" if method == "POST" else None,
        ) as resp:
            body = (await resp.read()).decode(errors="replace").strip()
            if resp.status >= 500:
                kind = "5xx"
            elif resp.status != 200:
                kind = "other"
            else:
                kind = "ok"  # checked against every replica's id once the run ends
            backend = body[: 12 if kind == "ok" else 120]
            return Outcome(rid, sent, time.time(), method, kind, resp.status, backend)
    except TimeoutError:
        return Outcome(rid, sent, time.time(), method, "timeout")
    except (aiohttp.ClientError, OSError):
        return Outcome(rid, sent, time.time(), method, "conn")


async def load(
    target: Target,
    stop: asyncio.Event,
    concurrency: int,
    post_share: float,
    max_requests: int,
    into: list[Outcome],
) -> None:
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    counter = iter(range(max_requests))
    post_every = round(1 / post_share) if post_share > 0 else 0

    async def worker(http: aiohttp.ClientSession) -> None:
        for n in counter:
            if stop.is_set():
                return
            method = "POST" if post_every and n % post_every == 0 else "GET"
            into.append(await send(http, target, method, "whoami", str(n)))

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        async with asyncio.TaskGroup() as tasks:
            for _ in range(concurrency):
                tasks.create_task(worker(http))


async def queries_of_death(target: Target, count: int, every: float, into: list[Outcome]) -> None:
    """COUNT requests that crash whatever backend serves them, one every EVERY seconds, each on
    a connection of its own, without waiting for the previous one's answer; the load goes on for
    EVERY seconds after the last, so what a query of death does to the requests after it shows."""

    async def one(http: aiohttp.ClientSession, rid: str) -> None:
        into.append(await send(http, target, "GET", "qod", rid))

    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as http, asyncio.TaskGroup() as tasks:
        for i in range(count):
            tasks.create_task(one(http, f"qod-{i}"))
            await asyncio.sleep(every)


# ---------------------------------------------------------------- restarts


async def restart_once(kind: str, target: Target, replicas: Replicas, index: int) -> None:
    box = replicas.containers[index]
    if kind == "restart":
        await asyncio.to_thread(box.restart, timeout=2)
    elif kind == "stop-start":
        await asyncio.to_thread(box.stop, timeout=2)
        thief = await asyncio.to_thread(replicas.run, "thief")  # takes the freed address
        await asyncio.to_thread(box.start)
        await asyncio.to_thread(thief.remove, force=True)
    elif kind == "kill":
        await asyncio.to_thread(box.kill)
        await asyncio.to_thread(box.start)
    elif kind == "rolling":
        await asyncio.to_thread(replicas.run)  # appended to the replicas
        replicas.containers.remove(box)
        await target.wait_whole(replicas, len(replicas.containers), exact=False)
        await asyncio.to_thread(box.stop, timeout=2)
        await asyncio.to_thread(box.remove)
    else:
        raise ValueError(kind)


async def scenario(
    target: Target, replicas: Replicas, kinds: list[str], restarts: int
) -> dict[str, int]:
    done: Counter[str] = Counter()
    count = len(replicas.containers)
    for kind in kinds:
        for i in range(restarts):
            index = i % count
            await restart_once(kind, target, replicas, index)
            await target.wait_whole(replicas, count)
            done[kind] += 1
    return dict(done)


# ---------------------------------------------------------------- DNS


@dataclass(slots=True)
class Lookup:
    began: float
    ended: float
    addresses: tuple[str, ...]


def parse_lookups(lines: list[tuple[float, str]]) -> list[Lookup]:
    """Lines (docker log timestamp, text) of `echo Q; nslookup NAME SERVER` rounds."""
    out: list[Lookup] = []
    began: float | None = None
    addrs: list[str] = []
    in_answer = False
    for at, text in lines:
        if text == "Q":
            if began is not None:
                out.append(Lookup(began, at, tuple(addrs)))
            began, addrs, in_answer = at, [], False
        elif text.startswith("Name:"):
            in_answer = True
        elif in_answer and text.startswith("Address:"):
            addrs.append(text.split(":", 1)[1].strip())
    return out


def docker_time(stamp: str) -> float:
    head, _, frac = stamp.rstrip("Z").partition(".")
    return datetime.fromisoformat(head + "+00:00").timestamp() + float("0." + (frac or "0"))


async def dns_client(replicas: Replicas, server: str, rounds: int) -> Any:
    script = (
        f"for i in $(seq 1 {rounds}); do echo Q; nslookup -type=a {SERVICE}.{ZONE} {server}; "
        "sleep 0.02; done; echo Q"
    )
    box = await asyncio.to_thread(
        replicas.client.containers.run,
        replicas.image,
        ["sh", "-c", script],
        name=f"{replicas.prefix}-dnsclient",
        detach=True,
        labels={"fo.prefix": replicas.prefix, "fo.role": "dns-client"},
    )
    replicas.created.append(str(box.id))  # removed with the rest at the end
    return box


def stale_answers(lookups: list[Lookup], ownership: Ownership) -> list[Lookup]:
    return [
        lk
        for lk in lookups
        if any(not ownership.held_during(ip, lk.began, lk.ended) for ip in lk.addresses)
    ]


# ---------------------------------------------------------------- report


def executions(outcomes: list[Outcome], ledger: Executions) -> dict[str, Any]:
    """The requests as the backends saw them: run twice (a POST never may), and POSTs answered
    with an error that ran all the same."""

    def twice(method: str) -> list[Outcome]:
        return [o for o in outcomes if o.method == method and ledger.count(o.rid) > 1]

    posts = [o for o in outcomes if o.method == "POST"]
    failed_posts = [o for o in posts if o.kind != "ok"]
    return {
        "recorded": sum(len(h) for h in ledger.hosts.values()),
        "garbled_lines": ledger.garbled,
        "duplicated_post": len(twice("POST")),
        "duplicated_get": len(twice("GET")),
        "duplicated_post_examples": [
            f"{o.rid} ({o.kind}): {', '.join(ledger.hosts[o.rid])}" for o in twice("POST")[:5]
        ],
        "failed_post_executed": sum(1 for o in failed_posts if ledger.count(o.rid)),
        "failed_post_not_executed": sum(1 for o in failed_posts if not ledger.count(o.rid)),
        # A right answer comes from the CGI, which records first: these would be a ledger fault.
        "ok_unrecorded": sum(1 for o in outcomes if o.kind == "ok" and not ledger.count(o.rid)),
    }


def query_of_death(qods: list[Outcome], ledger: Executions) -> dict[str, Any]:
    reached = [ledger.count(o.rid) for o in sorted(qods, key=lambda o: o.sent)]
    answered = [(o.done - o.sent) * 1000 for o in qods]
    return {
        "sent": len(qods),
        "reached": reached,  # backend executions of each, in the order sent
        "reached_max": max(reached, default=0),
        "answers": dict(Counter(str(o.status) if o.status else o.kind for o in qods)),
        "answer_p50_ms": round(percentile(answered, 50), 1),
        "answer_max_ms": round(max(answered, default=0.0), 1),
    }


def ejections(events: list[dict[str, Any]]) -> dict[str, int]:
    """Passive ejections in the admin API's events (`ready -> unhealthy (ejected after ...)`):
    how many, of how many endpoints, and the most out at one time."""
    out: set[str] = set()
    names: set[str] = set()
    total = most = 0
    for event in events:
        name = event["endpoint"]
        if event["kind"] not in ("state", "removed"):
            continue
        state, _, reason = event["message"].partition(" -> ")[2].partition(" ")
        if event["kind"] == "state" and state != "ready" and "eject" in reason:
            total += 1
            names.add(name)
            out.add(name)
            most = max(most, len(out))
        else:
            out.discard(name)
    return {"count": total, "endpoints": len(names), "most_at_once": most}


def summarize(
    target: str,
    outcomes: list[Outcome],
    replicas: Replicas,
    restarts: dict[str, int],
    wall: float,
) -> dict[str, Any]:
    for o in outcomes:
        if o.kind == "ok" and o.backend not in replicas.ids:
            # Served by a container that is no replica (a thief), or cut short (no body).
            o.kind = "wrong-backend" if o.backend else "empty-body"
    gets = [o for o in outcomes if o.method == "GET"]
    posts = [o for o in outcomes if o.method == "POST"]
    lat = [(o.done - o.sent) * 1000 for o in outcomes if o.kind == "ok"]
    held = [x for x in lat if x > 250]
    first_routed = []
    served = sorted((o.done, o.backend) for o in outcomes if o.kind == "ok")
    times = [t for t, _ in served]
    for at, cid in replicas.starts:
        i = bisect.bisect_left(times, at)
        for t, backend in served[i:]:
            if backend == cid[:12]:
                first_routed.append((t - at) * 1000)
                break
    return {
        "target": target,
        "replicas": len(replicas.containers),
        "restarts": restarts,
        "seconds": round(wall, 1),
        "requests": len(outcomes),
        "failed_get": dict(Counter(o.kind for o in gets if o.kind != "ok")),
        "failed_get_examples": sorted({f"{o.status} {o.backend}" for o in gets if o.kind != "ok"})[
            :5
        ],
        "failed_post": dict(Counter(o.kind for o in posts if o.kind != "ok")),
        "get_requests": len(gets),
        "post_requests": len(posts),
        "p50_ms": round(percentile(lat, 50), 1),
        "p99_ms": round(percentile(lat, 99), 1),
        "max_ms": round(max(lat, default=0.0), 1),
        "held_requests": len(held),
        "held_p50_ms": round(percentile(held, 50), 1),
        "held_max_ms": round(max(held, default=0.0), 1),
        "start_to_first_routed_ms": {
            "count": len(first_routed),
            "p50": round(percentile(first_routed, 50), 1),
            "p99": round(percentile(first_routed, 99), 1),
        },
    }


@contextlib.contextmanager
def engine() -> Iterator[docker.DockerClient]:
    client = docker.from_env(version="auto", timeout=120)
    try:
        client.ping()
        yield client
    finally:
        client.close()


async def run(
    target_name: str,
    replica_count: int,
    kinds: list[str],
    restarts: int,
    concurrency: int,
    post_share: float,
    hold_timeout: float,
    max_requests: int,
    dns_rounds: int,
    query_of_death_count: int = 0,
    qod_every: float = 3.0,
    backend: str = "httpd",
    work_ms: float = 0.0,
) -> dict[str, Any]:
    with engine() as client:
        image = ensure_image(client)
        ledger = Ledger()
        prefix = f"fo{uuid.uuid4().hex[:6]}"
        serve = {
            "command": BACKENDS[backend],
            "volumes": ledger.volumes,
            "environment": {"WORK_US": str(round(work_ms * 1000))},
        }
        replicas = Replicas(client, image, prefix, serve)
        dns_port = free_port()
        target: Target = (
            Stablenet(hold_timeout, dns_port) if target_name == "stablenet" else Nginx()
        )
        try:
            for _ in range(replica_count):
                await asyncio.to_thread(replicas.run)
            await target.start(replicas)
            dns_box = None
            if isinstance(target, Stablenet) and dns_rounds:
                gateway = (await asyncio.to_thread(engine_networks)).bridge_gateway
                dns_box = await dns_client(replicas, f"{gateway}:{dns_port}", dns_rounds)
            outcomes: list[Outcome] = []
            qods: list[Outcome] = []
            stop = asyncio.Event()
            began = time.monotonic()
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(
                    load(target, stop, concurrency, post_share, max_requests, outcomes)
                )
                tasks.create_task(target.follow(stop))
                try:
                    async with asyncio.TaskGroup() as work:
                        restarted = work.create_task(scenario(target, replicas, kinds, restarts))
                        work.create_task(
                            queries_of_death(target, query_of_death_count, qod_every, qods)
                        )
                finally:
                    stop.set()
            wall = time.monotonic() - began
            result = summarize(target.name, outcomes, replicas, restarted.result(), wall)
            result |= {"backend": backend, "work_ms": work_ms}
            ledger_now = ledger.read()
            result["executions"] = executions(outcomes, ledger_now)
            if query_of_death_count:
                result["query_of_death"] = query_of_death(qods, ledger_now)
            result |= await target.figures()
            if dns_box is not None:
                with contextlib.suppress(docker.errors.APIError):  # it may have finished
                    await asyncio.to_thread(dns_box.kill)
                raw = await asyncio.to_thread(dns_box.logs, timestamps=True)
                lines = []
                for line in raw.decode(errors="replace").splitlines():
                    stamp, _, text = line.partition(" ")
                    lines.append((docker_time(stamp), text.strip()))
                lookups = parse_lookups(lines)
                stale = stale_answers(lookups, replicas.ownership)
                result["dns"] = {
                    "lookups": len(lookups),
                    "empty": sum(1 for lk in lookups if not lk.addresses),
                    "stale": len(stale),
                    "stale_examples": [asdict(s) for s in stale[:3]],
                }
            return result
        finally:
            await target.stop()
            await asyncio.to_thread(replicas.close)
            ledger.close()


def table(results: list[dict[str, Any]]) -> str:
    head = (
        "target",
        "replicas",
        "restarts",
        "requests",
        "failed GET",
        "failed POST",
        "p50 ms",
        "p99 ms",
        "max ms",
        "held",
        "held max ms",
        "start->routed p50 ms",
        "DNS lookups",
        "stale DNS",
        "duplicated POST",
        "duplicated GET",
        "failed POST executed",
        "QoD reached (max)",
        "ejections (most at once)",
    )
    rows = [head]
    for r in results:
        dns = r.get("dns", {})
        runs = r["executions"]
        qod = r.get("query_of_death")
        eject = r.get("ejections")
        rows.append(
            (
                r["target"] + ("" if r["backend"] == "httpd" else f", {r['backend']} backend"),
                str(r["replicas"]),
                ", ".join(f"{k} {v}" for k, v in r["restarts"].items()) or "none",
                str(r["requests"]),
                str(sum(r["failed_get"].values()))
                + (f" {r['failed_get']}" if r["failed_get"] else ""),
                str(sum(r["failed_post"].values()))
                + (f" {r['failed_post']}" if r["failed_post"] else ""),
                str(r["p50_ms"]),
                str(r["p99_ms"]),
                str(r["max_ms"]),
                str(r["held_requests"]),
                str(r["held_max_ms"]),
                str(r["start_to_first_routed_ms"]["p50"]),
                str(dns.get("lookups", "-")),
                str(dns.get("stale", "-")),
                str(runs["duplicated_post"]),
                str(runs["duplicated_get"]),
                f"{runs['failed_post_executed']} of {sum(r['failed_post'].values())}",
                f"{sum(qod['reached'])} for {qod['sent']} ({qod['reached_max']})" if qod else "-",
                f"{eject['count']} ({eject['most_at_once']})" if eject else "-",
            )
        )
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(out)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=("stablenet", "nginx", "both"), default="both")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--restarts", type=int, default=50, help="per kind")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--post-share", type=float, default=0.1)
    parser.add_argument("--hold-timeout", type=float, default=10.0)
    parser.add_argument("--max-requests", type=int, default=500_000)
    parser.add_argument("--dns-rounds", type=int, default=20_000)
    parser.add_argument(
        "--query-of-death",
        type=int,
        default=0,
        metavar="N",
        help="send N requests that crash the backend serving them (with --restarts 0: alone)",
    )
    parser.add_argument("--qod-every", type=float, default=3.0, help="seconds between them")
    parser.add_argument(
        "--backend",
        choices=tuple(BACKENDS),
        default="httpd",
        help="httpd: a connection per request; keepalive: connections reused",
    )
    parser.add_argument(
        "--work-ms", type=float, default=0.0, help="time each request works after it is recorded"
    )
    args = parser.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    for kind in kinds:
        if kind not in KINDS:
            parser.error(f"--kinds: {kind!r} is not one of {', '.join(KINDS)}")
    targets = ["stablenet", "nginx"] if args.target == "both" else [args.target]
    results = []
    for name in targets:
        results.append(
            await run(
                name,
                args.replicas,
                kinds,
                args.restarts,
                args.concurrency,
                args.post_share,
                args.hold_timeout,
                args.max_requests,
                args.dns_rounds,
                args.query_of_death,
                args.qod_every,
                args.backend,
                args.work_ms,
            )
        )
        print(json.dumps(results[-1]), flush=True)
    print(table(results))
    RESULTS.mkdir(exist_ok=True)
    qod = f"-qod{args.query_of_death}" if args.query_of_death else ""
    backend = "" if args.backend == "httpd" else f"-{args.backend}"
    out = RESULTS / f"failover-{args.replicas}r{qod}{backend}.json"
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
