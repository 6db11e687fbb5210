"""Test support: locally built images, containers the tests own, private engines, free ports.
Nothing is pulled; every image is a `docker import` of a busybox folder."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import io
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.errors
import requests

from stablenet.docker.source import DockerLost, default_client
from stablenet.registry import Registry, Snapshot

T = TypeVar("T")
BUSYBOX = Path("/bin/busybox")
IMAGE_REPO = "stablenet-test/busybox"

# A CGI script that names the container serving the request: tells replicas apart.
WHOAMI_CGI = '#!/bin/sh\nprintf "Content-Type: text/plain\\r\\n\\r\\n"\nhostname\n'


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _image_tar() -> bytes:
    """A root filesystem: static busybox, its applets, a web root with /healthz and a CGI."""
    if not BUSYBOX.exists():
        raise RuntimeError("/bin/busybox is missing: install busybox-static (scripts/install.sh)")
    applets = subprocess.run(
        [str(BUSYBOX), "--list"], check=True, capture_output=True, text=True
    ).stdout.split()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:

        def add_dir(name: str) -> None:
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if name == "tmp" else 0o755
            tar.addfile(info)

        def add_file(name: str, data: bytes, mode: int = 0o644) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = mode
            tar.addfile(info, io.BytesIO(data))

        for name in ("bin", "etc", "tmp", "www", "www/cgi-bin"):
            add_dir(name)
        add_file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
        for applet in sorted(set(applets) - {"busybox"}):
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type = tarfile.SYMTYPE
            link.linkname = "busybox"
            tar.addfile(link)
        add_file("etc/passwd", b"root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n")
        add_file("etc/group", b"root:x:0:\nnogroup:x:65534:\n")
        add_file("www/index.html", b"ok\n")
        add_file("www/healthz", b"healthy\n")
        add_file("www/cgi-bin/whoami", WHOAMI_CGI.encode(), 0o755)
    return buf.getvalue()


@functools.cache
def image_tar() -> bytes:
    return _image_tar()


def ensure_image(client: docker.DockerClient) -> str:
    """Import the busybox test image into this engine once; return its tag."""
    data = image_tar()
    tag = hashlib.sha256(data).hexdigest()[:12]
    ref = f"{IMAGE_REPO}:{tag}"
    try:
        client.images.get(ref)
    except docker.errors.ImageNotFound:
        client.api.import_image_from_data(
            data, repository=IMAGE_REPO, tag=tag, changes=["ENV PATH=/bin", 'CMD ["/bin/sh"]']
        )
        client.images.get(ref)
    return ref


HTTPD = ["httpd", "-f", "-p", "80", "-h", "/www"]


@dataclass
class Containers:
    """Creates containers with unique names and removes every one of them at the end."""

    client: docker.DockerClient
    image: str
    prefix: str = field(default_factory=lambda: f"snt-{uuid.uuid4().hex[:6]}")
    created: list[str] = field(default_factory=list)
    networks: list[str] = field(default_factory=list)

    def name(self, suffix: str) -> str:
        return f"{self.prefix}-{suffix}"

    def run(
        self,
        suffix: str,
        labels: dict[str, str] | None = None,
        command: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        container = self.client.containers.run(
            self.image,
            command or HTTPD,
            name=self.name(suffix),
            labels=labels or {},
            detach=True,
            **kwargs,
        )
        self.created.append(str(container.id))
        container.reload()
        return container

    def network(self, suffix: str, **kwargs: Any) -> Any:
        net = self.client.networks.create(self.name(suffix), **kwargs)
        self.networks.append(str(net.id))
        return net

    def cleanup(self) -> None:
        for cid in reversed(self.created):
            with contextlib.suppress(docker.errors.NotFound):
                self.client.api.remove_container(cid, force=True)
        for nid in self.networks:
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                self.client.api.remove_network(nid)


async def off_loop(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking docker call in a thread so the loop (and the source under test) runs on."""
    return await asyncio.to_thread(functools.partial(fn, *args, **kwargs))


async def until(
    registry: Registry, predicate: Callable[[Snapshot], bool], within: float
) -> Snapshot:
    """The first snapshot for which ``predicate`` holds; the test fails after ``within`` s."""
    async with asyncio.timeout(within):
        return await registry.until(predicate)


async def eventually(check: Callable[[], bool], within: float) -> None:
    """For state with no event to await (counters, another thread's results): look every
    20 ms; the test fails after ``within`` s."""
    async with asyncio.timeout(within):
        while True:
            if check():
                return
            await asyncio.sleep(0.02)


async def asked_until(check: Callable[[], Awaitable[bool]], within: float) -> None:
    """For state in another process (a daemon's admin API), which has no event to await: ask
    again every 200 ms; the test fails after ``within`` s."""
    async with asyncio.timeout(within):
        while True:
            if await check():
                return
            await asyncio.sleep(0.2)


def ip_of(container: Any, network: str = "bridge") -> str:
    container.reload()
    return str(container.attrs["NetworkSettings"]["Networks"][network]["IPAddress"])


@dataclass
class PrivateEngine:
    """A dockerd of the test's own: own data root, exec root, socket, pid file and bridge,
    no iptables, live-restore on (containers outlive the engine, as in production restarts)."""

    root: Path
    bridge: str
    subnet: str
    pid: int | None = None
    log: Any = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"unix://{self.root}/docker.sock"

    def client(self) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.host, version="auto", timeout=30)

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.log = open(self.root / "dockerd.log", "ab")  # noqa: SIM115 - closed in stop()
        proc = subprocess.Popen(
            [
                "dockerd",
                "--data-root",
                str(self.root / "data"),
                "--exec-root",
                str(self.root / "exec"),
                "--pidfile",
                str(self.root / "dockerd.pid"),
                "-H",
                self.host,
                "--bridge",
                self.bridge,
                "--iptables=false",
                "--ip-masq=false",
                "--live-restore",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pid = proc.pid
        self.proc = proc
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"private dockerd exited; see {self.root / 'dockerd.log'}")
            try:
                default_client(self.host).close()
                return
            except (docker.errors.DockerException, requests.RequestException, DockerLost):
                time.sleep(0.1)
        raise RuntimeError("private dockerd did not answer within 60 s")

    def stop(self) -> None:
        if self.proc is None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None
        self.pid = None
        if self.log is not None:
            self.log.close()
            self.log = None


@contextlib.contextmanager
def private_engine(root: Path) -> Iterator[PrivateEngine]:
    """Start a private engine on a bridge of its own; stop it and remove everything after."""
    if shutil.which("dockerd") is None:
        raise RuntimeError("dockerd is missing: install docker.io (scripts/install.sh)")
    bridge = f"snt{uuid.uuid4().hex[:8]}"
    subnet_octet = 200 + int(uuid.uuid4().hex[:2], 16) % 50
    subnet = f"10.{subnet_octet}.77.1/24"
    subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True)
    engine = PrivateEngine(root, bridge, subnet)
    try:
        subprocess.run(["ip", "addr", "add", subnet, "dev", bridge], check=True)
        subprocess.run(["ip", "link", "set", bridge, "up"], check=True)
        engine.start()
        yield engine
    finally:
        with contextlib.suppress(Exception):
            if engine.pid is None:
                engine.start()
            with contextlib.closing(engine.client()) as client:
                for container in client.containers.list(all=True):
                    container.remove(force=True)
        engine.stop()
        subprocess.run(["ip", "link", "del", bridge], check=False)
        subprocess.run(["umount", "-R", str(root / "data")], check=False, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
