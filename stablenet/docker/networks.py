"""The engine's networks as the DNS server needs them: every subnet (for `dns.allow = docker`)
and the default bridge's gateway (for `dns.listen = docker:53`). Blocking: call it in a thread."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import docker

from stablenet.dns.server import EngineNetworks, gateway_of
from stablenet.docker.source import default_client


def engine_networks(
    client_factory: Callable[[], docker.APIClient] = default_client,
) -> EngineNetworks:
    client = client_factory()
    try:
        listed: list[dict[str, Any]] = client.networks()
    finally:
        client.close()
    subnets: list[str] = []
    gateway: str | None = None
    for net in listed:
        configs = (net.get("IPAM") or {}).get("Config") or []
        for config in configs:
            subnet = config.get("Subnet")
            if not subnet:
                continue
            subnets.append(str(subnet))
            is_default = (net.get("Options") or {}).get(
                "com.docker.network.bridge.default_bridge"
            ) == "true" or net.get("Name") == "bridge"
            if is_default and gateway is None and ":" not in subnet:
                gateway = str(config.get("Gateway") or gateway_of(subnet))
    return EngineNetworks(tuple(subnets), gateway)


def network_subnets(
    client_factory: Callable[[], docker.APIClient] = default_client,
) -> list[tuple[str, str]]:
    """(network name, subnet) of every engine network, plus the engine's default address pools
    as ("default-address-pools", base) when it reports them: what a virtual address range must
    stay clear of."""
    client = client_factory()
    try:
        listed: list[dict[str, Any]] = client.networks()
        info: dict[str, Any] = client.info()
    finally:
        client.close()
    out = [
        (str(net.get("Name")), str(config["Subnet"]))
        for net in listed
        for config in (net.get("IPAM") or {}).get("Config") or []
        if config.get("Subnet")
    ]
    for pool in info.get("DefaultAddressPools") or []:
        if pool.get("Base"):
            out.append(("default-address-pools", str(pool["Base"])))
    return out
