"""A real etcd cluster for tests and benchmarks: members started from Debian's etcd-server on
loopback (and any extra local addresses), each with its own data directory, stopped by PID.
Also a TCP relay that can go silent, to cut one client off from etcd as a network partition
would (connections stay open, nothing passes)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import free_port


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    proc: subprocess.Popen[bytes] | None = None


@dataclass
class EtcdCluster:
    root: Path
    size: int = 3
    hosts: Sequence[str] = ("127.0.0.1",)  # addresses the members serve clients on
    members: list[Member] = field(default_factory=list)
    token: str = field(default_factory=lambda: "sn-" + uuid.uuid4().hex[:8])

    def __post_init__(self) -> None:
        for i in range(self.size):
            self.members.append(Member(f"m{i}", free_port(), free_port(), self.root / f"m{i}"))

    def urls(self, host: str = "127.0.0.1") -> list[str]:
        return [f"http://{host}:{m.client_port}" for m in self.members]

    def _initial(self) -> str:
        return ",".join(f"{m.name}=http://127.0.0.1:{m.peer_port}" for m in self.members)

    def start_member(self, i: int) -> None:
        m = self.members[i]
        m.data_dir.mkdir(parents=True, exist_ok=True)
        listen = ",".join(f"http://{h}:{m.client_port}" for h in self.hosts)
        log = open(self.root / f"{m.name}.log", "ab")  # noqa: SIM115 - the child keeps it
        m.proc = subprocess.Popen(
            [
                "etcd", "--name", m.name, "--data-dir", str(m.data_dir),
                "--listen-client-urls", listen,
                "--advertise-client-urls", f"http://127.0.0.1:{m.client_port}",
                "--listen-peer-urls", f"http://127.0.0.1:{m.peer_port}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{m.peer_port}",
                "--initial-cluster", self._initial(),
                "--initial-cluster-token", self.token,
                "--initial-cluster-state", "new",
                "--heartbeat-interval", "50", "--election-timeout", "500",
                "--log-level", "warn", "--logger", "zap",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        log.close()

    def start(self) -> None:
        if shutil.which("etcd") is None:
            raise RuntimeError("etcd is missing: install etcd-server (scripts/install.sh)")
        for i in range(self.size):
            self.start_member(i)
        self.wait_healthy()

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until every running member says healthy (it has a leader)."""
        deadline = time.monotonic() + timeout
        for m in self.members:
            if m.proc is None:
                continue
            while True:
                if m.proc.poll() is not None:
                    log = (self.root / f"{m.name}.log").read_text()[-2000:]
                    raise RuntimeError(f"etcd member {m.name} exited: {log}")
                try:
                    url = f"http://127.0.0.1:{m.client_port}/health"
                    with urllib.request.urlopen(url, timeout=1) as resp:
                        if b'"true"' in resp.read():
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"etcd member {m.name} not healthy within {timeout}s")
                time.sleep(0.05)

    def stop_member(self, i: int, sig: int = signal.SIGKILL) -> None:
        m = self.members[i]
        if m.proc is not None:
            os.kill(m.proc.pid, sig)
            m.proc.wait(timeout=30)
            m.proc = None

    def stop(self) -> None:
        for i in range(self.size):
            with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
                self.stop_member(i)


@contextlib.contextmanager
def etcd_cluster(
    root: Path, size: int = 3, hosts: Sequence[str] = ("127.0.0.1",)
) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(root, size, hosts)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


class Relay:
    """Forwards one local port to a target; ``cut()`` stops passing bytes (connections stay
    open, new ones are accepted and hang) as a partition does, ``heal()`` passes them again."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.open = asyncio.Event()
        self.open.set()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Relay:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    def cut(self) -> None:
        self.open.clear()

    def heal(self) -> None:
        self.open.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            await self.open.wait()
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            self._writers.add(up_writer)
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._pipe(reader, up_writer))
                tasks.create_task(self._pipe(up_reader, writer))
        except (OSError, ExceptionGroup):
            pass
        finally:
            writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self.open.wait()
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()
