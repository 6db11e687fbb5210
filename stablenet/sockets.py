"""Listening sockets, owned apart from the servers that accept on them: bound early (so the
kernel holds connections and datagrams while the registry syncs), inherited from a predecessor
(handover.py), and listed again to be handed on. Servers ask ``take(kind, host, port)`` for a
socket instead of binding their own; nothing here accepts, reads or writes."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from collections.abc import Iterable

logger = logging.getLogger(__name__)

Key = tuple[str, str, int]  # kind ("tcp" or "udp"), host (an IP literal), port
BACKLOG = 1024  # what the proxy's listeners ask for; queued connections wait here until served


def key_text(key: Key) -> str:
    kind, host, port = key
    return f"{kind}:[{host}]:{port}" if ":" in host else f"{kind}:{host}:{port}"


def bind(kind: str, host: str, port: int, backlog: int = BACKLOG) -> socket.socket:
    """A bound socket (listening, for TCP), non-blocking, as asyncio's servers bind theirs."""
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
    try:
        if kind == "tcp":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        if kind == "tcp":
            sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


SD_LISTEN_FDS_START = 3


def from_systemd() -> list[socket.socket]:
    """Sockets passed by systemd socket activation (LISTEN_PID/LISTEN_FDS, from fd 3). The
    variables are removed so children (a SIGHUP successor) do not take them for theirs."""
    pid = os.environ.pop("LISTEN_PID", "")
    count = os.environ.pop("LISTEN_FDS", "")
    os.environ.pop("LISTEN_FDNAMES", None)
    if not pid.isdigit() or int(pid) != os.getpid() or not count.isdigit():
        return []
    out = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)):
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        out.append(sock)
    logger.info("socket activation: %d listening sockets passed in", len(out))
    return out


def key_of(sock: socket.socket) -> Key:
    """Where a socket is bound, as the key a server asks for."""
    name = sock.getsockname()
    kind = "tcp" if sock.type == socket.SOCK_STREAM else "udp"
    return (kind, str(name[0]), int(name[1]))


class Sockets:
    """Every listening socket this process serves on, by (kind, host, port). Sockets waiting
    for their server (bound early or inherited) are ``spare``; those handed to a server are
    ``given`` and stay listed while open, so a successor can inherit them."""

    def __init__(self, inherited: Iterable[socket.socket] = ()) -> None:
        self.spare: dict[Key, socket.socket] = {}
        self.given: dict[Key, socket.socket] = {}
        self.inherited = 0
        for sock in inherited:
            sock.setblocking(False)
            self.spare[key_of(sock)] = sock
            self.inherited += 1

    def prebind(self, keys: Iterable[Key]) -> None:
        """Bind now what is not inherited, so connections queue until the servers start. A
        failure is left for the server to report when it binds, with its config key."""
        for key in keys:
            if key in self.spare or key in self.given:
                continue
            try:
                self.spare[key] = bind(*key)
            except OSError as exc:
                logger.debug("cannot bind %s early: %s", key_text(key), exc)

    def take(self, kind: str, host: str, port: int) -> socket.socket | None:
        """The socket for a server to accept on: inherited or bound early, else bound now.
        None when it cannot be bound (the server then binds itself and reports why)."""
        key = (kind, host, port)
        sock = self.spare.pop(key, None)
        if sock is None and port == 0:
            return None  # an ephemeral port: nothing to inherit, nothing to hand on
        if sock is None:
            try:
                sock = bind(kind, host, port)
            except OSError:
                return None
        self.given[key] = sock
        return sock

    def live(self) -> list[socket.socket]:
        """Sockets to hand to a successor: every one still open, spare or given."""
        self.given = {key: sock for key, sock in self.given.items() if sock.fileno() != -1}
        return [*self.given.values(), *self.spare.values()]

    def close_spare(self) -> None:
        """Close what no server took (a listener the new config no longer has)."""
        for key, sock in self.spare.items():
            logger.info("closing inherited listener %s: this config does not use it", key_text(key))
            sock.close()
        self.spare.clear()
