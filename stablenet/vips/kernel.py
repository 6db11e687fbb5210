"""The kernel side: libnftables (Debian's python3-nftables binding) for stablenet's table, the
conntrack tool for stale UDP flows, and the host's routes for the range check. Blocking calls run
in a worker thread, one at a time; nothing here decides what to program."""

from __future__ import annotations

import asyncio
import importlib.util
import ipaddress
import json
import logging
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

from stablenet.vips import rules

logger = logging.getLogger(__name__)

DEBIAN_BINDING = Path("/usr/lib/python3/dist-packages/nftables")
SYS_NET = Path("/sys/class/net")


class KernelError(Exception):
    """libnftables refused a transaction, or is missing; str() says what to do."""


def load_binding() -> ModuleType:
    """The ``nftables`` module: importable as is (scripts/install.sh links it into the
    virtualenv), or loaded from Debian's python3-nftables package, that package alone (the
    system's other site-packages stay out of the virtualenv)."""
    try:
        return importlib.import_module("nftables")
    except ImportError:
        pass
    init = DEBIAN_BINDING / "__init__.py"
    spec = importlib.util.spec_from_file_location(
        "nftables", init, submodule_search_locations=[str(DEBIAN_BINDING)]
    )
    if not init.exists() or spec is None or spec.loader is None:
        raise KernelError(
            "vips: the libnftables binding is missing; install it with "
            "`apt-get install nftables python3-nftables` (scripts/install.sh does)"
        )
    module = importlib.util.module_from_spec(spec)
    sys.modules["nftables"] = module
    spec.loader.exec_module(module)
    return module


class Nft:
    """One libnftables context for commands and one for JSON listings."""

    def __init__(self) -> None:
        binding = load_binding()
        try:
            self._cmd = binding.Nftables()
            self._json = binding.Nftables()
        except OSError as exc:
            raise KernelError(f"vips: cannot load libnftables: {exc}") from None
        self._json.set_json_output(True)
        self._lock = asyncio.Lock()

    # -- blocking ---------------------------------------------------------------------------

    def run_blocking(self, commands: list[str]) -> None:
        if not commands:
            return
        code, _, err = self._cmd.cmd("\n".join(commands))
        if code != 0:
            raise KernelError(err.strip() or f"libnftables failed ({code})")

    def list_blocking(self) -> dict[str, Any] | None:
        code, out, err = self._json.cmd(f"list table {rules.TABLE}")
        if code != 0:
            if "No such file or directory" in err:
                return None
            raise KernelError(err.strip() or f"libnftables failed ({code})")
        listing: dict[str, Any] = json.loads(out)
        return listing

    # -- off the event loop -----------------------------------------------------------------

    async def run(self, commands: list[str]) -> None:
        async with self._lock:
            await asyncio.to_thread(self.run_blocking, commands)

    async def read(self) -> rules.Table | None:
        """The table as the kernel holds it, or None when there is none."""
        async with self._lock:
            listing = await asyncio.to_thread(self.list_blocking)
        return None if listing is None else rules.parse(listing)

    async def delete_table(self) -> bool:
        """Remove stablenet's table; False when there was none."""
        async with self._lock:
            listing = await asyncio.to_thread(self.list_blocking)
            if listing is None:
                return False
            await asyncio.to_thread(self.run_blocking, [f"delete table {rules.TABLE}"])
        return True


async def _run(*argv: str) -> tuple[int, str]:
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
    except FileNotFoundError:
        return 127, f"{argv[0]}: not installed"
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace")


async def forget_udp(vip: str, port: int, reply_source: str | None = None) -> int:
    """Delete UDP conntrack entries to ``vip:port`` (only those answered by ``reply_source``
    when given), so the flow's next packet is translated afresh. Returns how many went."""
    argv = ["conntrack", "-D", "-p", "udp", "--orig-dst", vip, "--dport", str(port)]
    if reply_source is not None:
        argv += ["--reply-src", reply_source]
    code, out = await _run(*argv)
    if code == 127:
        logger.warning("vips: %s (apt-get install conntrack); stale UDP flows stay", out.strip())
        return 0
    for line in out.splitlines():  # "conntrack v1.4.7 (conntrack-tools): 2 flow entries ..."
        if "flow entries have been deleted" in line:
            try:
                return int(line.split(":")[-1].split()[0])
            except (ValueError, IndexError):
                return 0
    return 0


async def host_routes() -> list[tuple[str, str]]:
    """(destination, device) of the host's IPv4 unicast routes in every table but the local
    one, default routes left out (they cover everything and say nothing about a range)."""
    code, out = await _run("ip", "-j", "-4", "route", "show", "table", "all")
    if code != 0:
        return []
    try:
        routes = json.loads(out or "[]")
    except ValueError:
        return []
    return [
        (str(r.get("dst")), str(r.get("dev", "")))
        for r in routes
        if r.get("dst")
        and r.get("dst") != "default"
        and r.get("type", "unicast") == "unicast"
        and r.get("table") != "local"
    ]


def proc_routes() -> list[tuple[str, str]]:
    """(destination, device) of the main table's IPv4 routes, from /proc/net/route (a file
    read: no process to start on the event loop's behalf)."""
    out: list[tuple[str, str]] = []
    try:
        lines = Path("/proc/net/route").read_text().splitlines()[1:]
    except OSError:
        return out
    for line in lines:
        fields = line.split()
        if len(fields) < 8 or fields[1] == "00000000":
            continue
        dst = ipaddress.IPv4Address(int(fields[1], 16).to_bytes(4, "little"))
        mask = ipaddress.IPv4Address(int(fields[7], 16).to_bytes(4, "little"))
        out.append((f"{dst}/{bin(int(mask)).count('1')}", fields[0]))
    return out


def _bridge_of(address: str, routes: list[tuple[str, str]]) -> str | None:
    """The bridge whose connected route holds ``address`` (longest prefix), or None."""
    ip = ipaddress.IPv4Address(address)
    best: tuple[int, str] | None = None
    for dst, dev in routes:
        try:
            net = ipaddress.IPv4Network(dst, strict=False)
        except ValueError:
            continue
        if ip in net and (best is None or net.prefixlen > best[0]):
            best = (net.prefixlen, dev)
    if best is None or not (SYS_NET / best[1] / "bridge").is_dir():
        return None
    return best[1]


def hairpin_blocking(addresses: Iterable[str]) -> list[str]:
    """Turn on hairpin mode on the ports of the bridges that hold these endpoints: a container
    reaching its own service's address is translated back to itself, and a bridge sends a frame
    back out the port it came in on only in that mode (Docker does the same for its published
    ports when run with userland-proxy=false). Returns the bridges changed."""
    changed: list[str] = []
    routes = proc_routes()
    for bridge in sorted({b for a in addresses if (b := _bridge_of(a, routes)) is not None}):
        for mode in (SYS_NET / bridge / "brif").glob("*/hairpin_mode"):
            try:
                if mode.read_text().strip() != "1":
                    mode.write_text("1")
                    if bridge not in changed:
                        changed.append(bridge)
            except OSError:
                continue  # the port went away meanwhile
    return changed


async def hairpin(addresses: Iterable[str]) -> None:
    changed = await asyncio.to_thread(hairpin_blocking, list(addresses))
    for bridge in changed:
        logger.info("vips: hairpin mode on for the ports of bridge %s", bridge)
