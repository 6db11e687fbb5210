"""The fixed virtual address: make sure the proxy's listen address is local to this host before
anything binds or sends to it. This kernel has no dummy link type, so a missing address is added
as a /32 on lo (only as root), and removed on shutdown only if it was added here."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os

from stablenet.errors import StartupError

logger = logging.getLogger(__name__)


def needs_adding(host: str) -> bool:
    """Wildcard and loopback addresses are always local; anything else must be checked."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return not (ip.is_unspecified or ip.is_loopback)


async def _run(*argv: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace")


async def is_local(host: str) -> bool:
    """True when the kernel routes ``host`` to this machine (``ip route get`` says local)."""
    code, out = await _run("ip", "route", "get", host)
    return code == 0 and out.lstrip().startswith("local ")


async def ensure_local(host: str, key: str = "proxy.listen") -> bool:
    """Make ``host`` a local address. Returns True when this call added it (remove it later)."""
    if not needs_adding(host) or await is_local(host):
        return False
    if os.geteuid() != 0:
        raise StartupError(
            f"{key}: {host} is on no interface and adding it needs root; run as root, add it "
            f"yourself (ip addr add {host}/32 dev lo), or listen on a local address"
        )
    prefix = 32 if ipaddress.ip_address(host).version == 4 else 128
    code, out = await _run("ip", "addr", "add", f"{host}/{prefix}", "dev", "lo")
    if code != 0 or not await is_local(host):
        raise StartupError(f"{key}: cannot add {host} to lo: {out.strip() or 'not local after'}")
    logger.info("virtual address %s added to lo", host)
    return True


async def remove(host: str) -> None:
    prefix = 32 if ipaddress.ip_address(host).version == 4 else 128
    code, out = await _run("ip", "addr", "del", f"{host}/{prefix}", "dev", "lo")
    if code != 0:
        logger.warning("could not remove virtual address %s from lo: %s", host, out.strip())
    else:
        logger.info("virtual address %s removed from lo", host)
