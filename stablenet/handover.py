"""Handing the listening sockets from a running stablenet to its successor, over a UNIX socket
with SCM_RIGHTS. The running process offers (``Offer``) on ``<controller.state_dir>/
handover-<admin port>.sock``; a starting one connects (``take_over``), receives every listening
socket (the same kernel sockets: their accept queues and queued datagrams carry over, so nothing
is refused or dropped), gets ready on them, and says so; the running one then stops accepting,
drains and exits. Nothing here knows what the sockets serve.

The conversation, one JSON line each way, after the peer's uid is checked (SO_PEERCRED):
successor ``{"hello": PID}`` -> running ``{"pid": PID, "sockets": N}`` plus the descriptors (in
batches of at most ``BATCH``) -> successor ``{"ready": true}`` once it serves. A successor that
closes the connection before ``ready`` gave up: the running process goes on as before."""

from __future__ import annotations

import array
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path

from stablenet.sockets import Sockets

logger = logging.getLogger(__name__)

BATCH = 200  # descriptors per message (the kernel takes at most 253)
TIMEOUT = 10.0  # seconds for each step of the conversation before the successor says ready
READY_WAIT = 120.0  # seconds the running one waits for its successor to serve
MAX_LINE = 65536


def notify_systemd(message: str) -> None:
    """Tell systemd (Type=notify, NotifyAccess=all) e.g. READY=1 and MAINPID: a successor
    started by SIGHUP becomes the unit's main process before its predecessor exits."""
    where = os.environ.get("NOTIFY_SOCKET", "")
    if not where:
        return
    address = "\0" + where[1:] if where.startswith("@") else where
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), address)


def path_for(state_dir: str, admin_listen: str) -> Path:
    """Where the stablenet with this admin address offers its sockets. The admin address names
    one running instance (two cannot share it), so a second `stablenet run` with the same config
    finds this one and no other."""
    tag = hashlib.sha256(admin_listen.encode()).hexdigest()[:10]
    return Path(state_dir) / f"handover-{tag}.sock"


def _readline(conn: socket.socket, buf: bytearray, fds: list[int] | None = None) -> bytes:
    """One line from a blocking socket (with descriptors, when ``fds`` collects them)."""
    while b"\n" not in buf:
        if fds is None:
            chunk = conn.recv(4096)
        else:
            space = socket.CMSG_SPACE(BATCH * array.array("i").itemsize)
            chunk, ancillary, _, _ = conn.recvmsg(4096, space)
            for level, kind, data in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    usable = len(data) - len(data) % array.array("i").itemsize
                    fds.extend(array.array("i", data[:usable]))
        _append(buf, chunk, "the stablenet we take over from")
    return _pop_line(buf)


def _append(buf: bytearray, chunk: bytes, peer: str) -> None:
    if not chunk:
        raise ConnectionError(f"{peer} closed the connection")
    buf += chunk
    if len(buf) > MAX_LINE:
        raise ValueError("handover message too long")


def _pop_line(buf: bytearray) -> bytes:
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line


class Predecessor:
    """The running stablenet we take over from: its sockets, and the channel to tell it we
    serve. Its connection closes when it exits."""

    def __init__(self, conn: socket.socket, pid: int, sockets: list[socket.socket]) -> None:
        self.conn = conn
        self.pid = pid
        self.sockets = sockets

    def ready(self) -> None:
        """We serve: the predecessor stops accepting, drains and exits."""
        self.conn.sendall(b'{"ready": true}\n')

    def abandon(self) -> None:
        """We will not serve: the predecessor goes on (our copies of its sockets close)."""
        for sock in self.sockets:
            sock.close()
        self.conn.close()

    async def gone(self) -> None:
        """Wait until the predecessor's process exits (its end of the channel closes)."""
        loop = asyncio.get_running_loop()
        self.conn.setblocking(False)
        with contextlib.suppress(OSError):
            while await loop.sock_recv(self.conn, 4096):
                pass
        self.conn.close()


def take_over(path: Path, required: bool = False) -> Predecessor | None:
    """Connect to the stablenet offering at ``path`` and receive its listening sockets. None
    when nothing answers there (none runs, or it died: a crash leaves the file behind), unless
    ``required`` (SIGHUP's successor), which raises ConnectionError. Blocking: call it before the
    event loop has anything else to do."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(TIMEOUT)
    try:
        conn.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        conn.close()
        if required:
            raise ConnectionError(f"no stablenet offers its sockets at {path}") from None
        return None
    except OSError:
        conn.close()
        raise
    try:
        conn.sendall(json.dumps({"hello": os.getpid()}).encode() + b"\n")
        fds: list[int] = []
        buf = bytearray()
        head = json.loads(_readline(conn, buf, fds))
        count = int(head["sockets"])
        while len(fds) < count:
            _readline(conn, buf, fds)  # a further batch: an empty line with descriptors
        sockets = [socket.socket(fileno=fd) for fd in fds]
    except BaseException:
        conn.close()
        raise
    conn.settimeout(None)
    logger.info(
        "taking over from stablenet pid %d: inherited %d listening sockets", head["pid"], count
    )
    return Predecessor(conn, int(head["pid"]), sockets)


class Offer:
    """The running side: listens at ``path``; hands ``sockets.live()`` to whoever connects (same
    uid only), then calls ``on_ready`` when that successor serves. An async context manager:
    leaving it stops offering and removes the path unless a successor replaced it."""

    def __init__(self, path: Path, sockets: Sockets, on_ready: Callable[[int], None]) -> None:
        self.path = path
        self.sockets = sockets
        self.on_ready = on_ready
        self.successors = 0
        self._listener: socket.socket | None = None
        self._inode = 0
        self._task: asyncio.Task[None] | None = None
        self._conns: list[socket.socket] = []

    async def __aenter__(self) -> Offer:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            temp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
            listener.bind(str(temp))
            os.chmod(temp, 0o600)
            listener.listen(4)
            listener.setblocking(False)
            os.replace(temp, self.path)  # atomic: a successor's file replaces its predecessor's
        except OSError as exc:
            logger.warning(
                "cannot offer a handover at %s (%s): a second `stablenet run` or SIGHUP cannot "
                "take over from this one",
                self.path,
                exc,
            )
            return self
        self._listener = listener
        self._inode = os.stat(self.path).st_ino
        self._task = asyncio.get_running_loop().create_task(self._accept(), name="handover")
        logger.info("offering a handover at %s", self.path)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._listener is not None:
            self._listener.close()
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == self._inode:
                    self.path.unlink()

    async def _accept(self) -> None:
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self._listener)
            try:
                successor = await self._converse(conn)
            except (OSError, ValueError, KeyError, TimeoutError) as exc:
                logger.warning("handover failed, serving on: %s", exc)
                conn.close()
                continue
            self._conns.append(conn)  # closed by our exit: the successor learns we are gone
            self.successors += 1
            self.on_ready(successor)

    async def _converse(self, conn: socket.socket) -> int:
        """Hand the sockets over; return the successor's pid once it serves, or raise when it
        gave up (closed the connection) or broke the protocol."""
        loop = asyncio.get_running_loop()
        conn.setblocking(False)
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _ = struct.unpack("3i", creds)
        if uid != os.getuid():
            raise ValueError(f"pid {pid} runs as uid {uid}, not ours; refused")
        buf = bytearray()
        async with asyncio.timeout(TIMEOUT):
            hello = json.loads(await _readline_async(loop, conn, buf))
        successor = int(hello["hello"])
        socks = self.sockets.live()
        fds = [sock.fileno() for sock in socks]
        logger.info("stablenet pid %d takes over: handing it %d sockets", successor, len(fds))
        head = json.dumps({"pid": os.getpid(), "sockets": len(fds)}).encode() + b"\n"
        conn.setblocking(True)  # a few hundred bytes: the send never waits on a live peer
        conn.settimeout(TIMEOUT)
        try:
            for start in range(0, max(len(fds), 1), BATCH):
                batch = array.array("i", fds[start : start + BATCH])
                ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, batch.tobytes())] if fds else []
                conn.sendmsg([head if start == 0 else b"\n"], ancillary)
        finally:
            conn.setblocking(False)
        # The successor syncs with Docker before it serves, within its own bound.
        async with asyncio.timeout(READY_WAIT):
            said = json.loads(await _readline_async(loop, conn, buf))
        if said.get("ready") is not True:
            raise ValueError(f"pid {successor} sent something other than ready")
        return successor


async def _readline_async(
    loop: asyncio.AbstractEventLoop, conn: socket.socket, buf: bytearray
) -> bytes:
    while b"\n" not in buf:
        _append(buf, await loop.sock_recv(conn, 4096), "the successor")
    return _pop_line(buf)
