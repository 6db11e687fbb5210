"""Two stablenet hosts on this machine, each a network namespace with its own Docker engine and
its own stablenet, on one LAN (a bridge in a namespace of its own) with this namespace, over a
3-member etcd cluster. Set up and torn down here; processes are stopped by PID. Any setup step
that fails fails the test loudly.

Addresses: LAN 10.251.0.0/24 (this namespace .1, host N .1N); host N's Docker bridge
10.25(1+N).1.1/24 and address pool 10.25(1+N).16.0/20, clear of the main engine's and each
other's. Leases are 2 s."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import docker
import pytest
import requests

from tests.etcd_members import EtcdCluster, etcd_cluster
from tests.helpers import ensure_image

pytestmark = pytest.mark.engine
LAN = "sncl-lan"
MAIN = "10.251.0.1"
TTL = 2
TOKEN = "cluster-test"
REPO = Path(__file__).resolve().parent.parent


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=30)


def http(address: str, port: int, path: str, host: str = "", timeout: float = 3) -> str:
    request = urllib.request.Request(f"http://{address}:{port}{path}")
    if host:
        request.add_header("Host", host)
    if path.startswith("/v1"):
        request.add_header("Authorization", f"Bearer {TOKEN}")
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        return str(resp.read().decode())


@dataclass
class Host:
    n: int
    root: Path
    netns: str
    address: str
    dockerd: subprocess.Popen[bytes] | None = None
    stablenet: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> str:
        return f"unix://{self.root}/docker.sock"

    def client(self) -> docker.DockerClient:
        # A fixed API version: the constructor then opens no connection it could leak.
        return docker.DockerClient(base_url=self.socket, version="1.41", timeout=30)

    def nsenter(self) -> list[str]:
        return ["nsenter", f"--net=/var/run/netns/{self.netns}"]

    def start_engine(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        octet = 251 + self.n
        with open(self.root / "dockerd.log", "ab") as log:
            self.dockerd = subprocess.Popen(
                [
                    *self.nsenter(), "dockerd", "--data-root", str(self.root / "data"),
                    "--exec-root", str(self.root / "exec"), "--pidfile", str(self.root / "pid"),
                    "-H", self.socket, "--bip", f"10.{octet}.1.1/24",
                    "--default-address-pool", f"base=10.{octet}.16.0/20,size=24",
                    "--shutdown-timeout", "1",
                ],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            if self.dockerd.poll() is not None:
                raise RuntimeError(f"dockerd of host {self.n} exited: see {self.root}")
            try:
                if (self.root / "docker.sock").exists():
                    with contextlib.closing(self.client()) as client:
                        client.ping()
                    return
            except (docker.errors.DockerException, requests.RequestException):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"dockerd of host {self.n} did not answer in 60 s")
            time.sleep(0.1)

    def start_stablenet(self, etcd: EtcdCluster) -> None:
        env = {
            **os.environ,
            "DOCKER_HOST": self.socket,
            "STABLENET_PURE": "1",
            "STABLENET_DNS_LISTEN": f"{self.address}:5353",
            "STABLENET_DNS_ALLOW": "10.251.0.0/24",
            "STABLENET_PROXY_LISTEN": f"{self.address}:8080",
            "STABLENET_ADMIN_LISTEN": f"{self.address}:9180",
            "STABLENET_ADMIN_TOKEN": TOKEN,
            "STABLENET_CONTROLLER_ENABLED": "false",
            "STABLENET_CONTROLLER_STATE_DIR": str(self.root / "state"),
            "STABLENET_CLUSTER_ETCD": ",".join(etcd.urls(MAIN)),
            "STABLENET_CLUSTER_HOST_NAME": f"host{self.n}",
            "STABLENET_CLUSTER_HOST_ADDRESS": self.address,
            "STABLENET_CLUSTER_LEASE_TTL": f"{TTL}s",
            "STABLENET_CLUSTER_PREFER": "spread",
        }
        with open(self.root / "stablenet.log", "ab") as log:
            self.stablenet = subprocess.Popen(
                [*self.nsenter(), sys.executable, "-m", "stablenet", "run", "--config",
                 "/dev/null"],
                env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            if self.stablenet.poll() is not None:
                log_text = (self.root / "stablenet.log").read_text()[-3000:]
                raise RuntimeError(f"stablenet of host {self.n} exited:\n{log_text}")
            try:
                if json.loads(http(self.address, 9180, "/readyz", timeout=1)).get("ready"):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"stablenet of host {self.n} not ready in 30 s")
            time.sleep(0.1)

    def services(self) -> dict[str, Any]:
        body: dict[str, Any] = json.loads(http(self.address, 9180, "/v1/services"))
        return body

    def kill(self) -> None:
        """The host dies: its stablenet at once, its engine (and containers) right after."""
        if self.stablenet is not None:
            os.kill(self.stablenet.pid, signal.SIGKILL)
            self.stablenet.wait(timeout=10)
            self.stablenet = None
        if self.dockerd is not None:
            os.kill(self.dockerd.pid, signal.SIGTERM)
            self.dockerd.wait(timeout=30)
            self.dockerd = None


@contextlib.contextmanager
def lan(root: Path, count: int) -> Iterator[list[Host]]:
    for tool in ("nsenter", "ip", "dockerd", "etcd"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is missing: run scripts/install.sh")
    hosts = [
        Host(n, root / f"host{n}", f"sncl-h{n}", f"10.251.0.1{n}") for n in range(1, count + 1)
    ]
    made: list[str] = []
    try:
        sh("ip", "netns", "add", LAN)
        made.append(LAN)
        sh("ip", "netns", "exec", LAN, "ip", "link", "add", "br0", "type", "bridge")
        sh("ip", "netns", "exec", LAN, "ip", "link", "set", "br0", "up")
        sh("ip", "link", "add", "sncl-main", "type", "veth", "peer", "name", "sncl-mainp")
        sh("ip", "link", "set", "sncl-mainp", "netns", LAN)
        sh("ip", "addr", "add", f"{MAIN}/24", "dev", "sncl-main")
        sh("ip", "link", "set", "sncl-main", "up")
        sh("ip", "netns", "exec", LAN, "ip", "link", "set", "sncl-mainp", "master", "br0", "up")
        for h in hosts:
            sh("ip", "netns", "add", h.netns)
            made.append(h.netns)
            sh("ip", "netns", "exec", h.netns, "ip", "link", "set", "lo", "up")
            sh("ip", "link", "add", f"sncl-{h.n}", "type", "veth", "peer", "name", f"sncl-{h.n}p")
            sh("ip", "link", "set", f"sncl-{h.n}", "netns", h.netns)
            sh("ip", "link", "set", f"sncl-{h.n}p", "netns", LAN)
            sh(
                "ip",
                "netns",
                "exec",
                LAN,
                "ip",
                "link",
                "set",
                f"sncl-{h.n}p",
                "master",
                "br0",
                "up",
            )
            sh(
                "ip",
                "netns",
                "exec",
                h.netns,
                "ip",
                "addr",
                "add",
                f"{h.address}/24",
                "dev",
                f"sncl-{h.n}",
            )
            sh("ip", "netns", "exec", h.netns, "ip", "link", "set", f"sncl-{h.n}", "up")
            sh("ip", "netns", "exec", h.netns, "ip", "route", "add", "default", "via", MAIN)
        yield hosts
    finally:
        for h in hosts:
            with contextlib.suppress(Exception):
                h.kill()
        with contextlib.suppress(Exception):
            sh("ip", "link", "del", "sncl-main")
        for name in reversed(made):
            with contextlib.suppress(Exception):
                sh("ip", "netns", "del", name)


def srv(address: str, name: str) -> list[str]:
    query = dns.message.make_query(name, "SRV")
    answer = dns.query.udp(query, address, port=5353, timeout=3)
    return sorted(str(rr) for rrset in answer.answer for rr in rrset)


def test_two_hosts_one_registry(tmp_path: Path) -> None:
    with lan(tmp_path, 2) as hosts, etcd_cluster(tmp_path / "etcd", 3, ("127.0.0.1", MAIN)) as etcd:
        for h in hosts:
            h.start_engine()
        for h in hosts:
            with contextlib.closing(h.client()) as client:
                client.containers.run(
                    ensure_image(client),
                    ["httpd", "-f", "-p", "8080", "-h", "/www"],
                    name=f"sncl-web-{h.n}",
                    labels={"stablenet.service": "web", "stablenet.port": "8080"},
                    ports={"8080/tcp": None},
                    detach=True,
                )
            h.start_stablenet(etcd)
        h1, h2 = hosts
        # Each host sees both replicas, its own and the other's (marked with its host).
        deadline = time.monotonic() + 10
        while True:
            views = [
                sorted((ep["name"], ep["host"]) for s in h.services()["services"]
                       if s["name"] == "web" for ep in s["endpoints"])
                for h in hosts
            ]  # fmt: skip
            if views == [
                [("sncl-web-1", ""), ("sncl-web-2", "host2")],
                [("sncl-web-1", "host1"), ("sncl-web-2", "")],
            ]:
                break
            assert time.monotonic() < deadline, f"views never converged: {views}"
            time.sleep(0.05)
        # Reached by name through either proxy: both replicas answer through each.
        for h in hosts:
            seen = {
                http(h.address, 8080, "/cgi-bin/whoami", "web.stablenet.internal")
                for _ in range(20)
            }
            assert len(seen) == 2, seen
        # And by name in DNS: SRV on either host gives both, each at an address and port that
        # answer from this namespace.
        for h in hosts:
            records = srv(h.address, "_8080._tcp.web.stablenet.internal")
            assert len(records) == 2, records
        assert "ready" in h2.services()["cluster"]["etcd"] or h2.services()["cluster"]["connected"]

        # One etcd member down changes nothing.
        etcd.stop_member(0)
        http(h2.address, 8080, "/cgi-bin/whoami", "web.stablenet.internal")
        assert (
            len([s for s in h2.services()["services"] if s["name"] == "web"][0]["endpoints"]) == 2
        )
        etcd.start_member(0)

        # Host 1 dies; host 2 keeps serving with no failed request and forgets host 1 in time.
        h1.kill()
        died = time.monotonic()
        gone_after = None
        failures = 0
        requests = 0
        while time.monotonic() - died < TTL + 2:
            try:
                http(h2.address, 8080, "/cgi-bin/whoami", "web.stablenet.internal", timeout=5)
            except OSError:
                failures += 1
            requests += 1
            if gone_after is None:
                web = [s for s in h2.services()["services"] if s["name"] == "web"]
                if web and all(ep["host"] == "" for ep in web[0]["endpoints"]):
                    gone_after = time.monotonic() - died
        assert failures == 0, f"{failures} of {requests} requests failed"
        assert gone_after is not None and gone_after <= TTL + 1, gone_after
