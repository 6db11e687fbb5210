"""The keys stablenet keeps in etcd, and the records under them. Pure: endpoints in, keys and
JSON values out, and back; nothing here does I/O.

stablenet's own layout, every key under the host's lease::

    <prefix>/hosts/<host>/info            {"address": HOST_ADDRESS, "ttl": LEASE_TTL_SECONDS}
    <prefix>/hosts/<host>/endpoints/<id>  one endpoint (see ``endpoint_record``)

The CoreDNS ``etcd`` plugin's layout (SkyDNS), for READY endpoints only, under the same lease::

    /skydns/<zone labels reversed>/<service>/<host>-<id[:12]>   {"host": ADDR, "port": N, "ttl": S}

so ``web.stablenet.internal`` is ``/skydns/internal/stablenet/web/...``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from stablenet.model import Endpoint, Origin, State

PUBLISHED = "published"  # other hosts reach host_address:published port
CONTAINER = "container"  # other hosts reach the container's own address and port


@dataclass(frozen=True, slots=True)
class Layout:
    """Where one host writes, and what it tells the others."""

    prefix: str
    host: str
    host_address: str
    ttl: int
    advertise: str = PUBLISHED
    zone: str = "stablenet.internal"
    skydns_prefix: str | None = "/skydns"  # None: no SkyDNS records
    dns_ttl: int = 5

    @property
    def hosts(self) -> str:
        """The prefix every host's keys live under (the one that is watched)."""
        return f"{self.prefix}/hosts/"

    @property
    def own(self) -> str:
        return f"{self.prefix}/hosts/{self.host}/"

    def info_key(self) -> str:
        return self.own + "info"

    def info_value(self) -> bytes:
        return _dump({"address": self.host_address, "ttl": self.ttl})

    def endpoint_key(self, cid: str) -> str:
        return f"{self.own}endpoints/{cid}"

    def skydns_key(self, service: str, cid: str) -> str | None:
        if self.skydns_prefix is None:
            return None
        reversed_zone = "/".join(reversed(self.zone.strip(".").split(".")))
        return f"{self.skydns_prefix}/{reversed_zone}/{service}/{self.host}-{cid[:12]}"

    def reachable(self, ep: Endpoint) -> tuple[str, int] | None:
        """The address and port another host reaches ``ep`` on, or None when it cannot (no
        port, or not published on every address in the default mode)."""
        if ep.port is None:
            return None
        if self.advertise == CONTAINER:
            return ep.address, ep.port
        if ep.host_port is None:
            return None
        return self.host_address, ep.host_port

    def desired(self, endpoints: Mapping[str, Endpoint]) -> dict[str, bytes]:
        """Every key this host should hold, with its value, for its local endpoints."""
        out = {self.info_key(): self.info_value()}
        for ep in endpoints.values():
            if ep.origin is not None:
                continue
            where = self.reachable(ep)
            if where is None:
                continue
            out[self.endpoint_key(ep.id)] = endpoint_record(ep, *where)
            key = self.skydns_key(ep.service, ep.id)
            if key is not None and ep.state is State.READY:
                out[key] = _dump({"host": where[0], "port": where[1], "ttl": self.dns_ttl})
        return out


def _dump(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def endpoint_record(ep: Endpoint, address: str, port: int) -> bytes:
    """One endpoint as other hosts need it: who it is, where to reach it, and its state."""
    return _dump(
        {
            "id": ep.id,
            "name": ep.name,
            "service": ep.service,
            "address": address,
            "port": port,
            "target_port": ep.port,
            "container_address": ep.address,
            "state": ep.state.value,
            "reason": ep.reason,
            "weight": ep.weight,
            "http_hosts": list(ep.http_hosts),
            "started_at": ep.started_at,
            "network": ep.network,
        }
    )


@dataclass(frozen=True, slots=True)
class HostInfo:
    address: str
    ttl: int


def parse_key(hosts_prefix: str, key: str) -> tuple[str, str, str] | None:
    """(host, kind, id) of a key under ``<prefix>/hosts/``: kind "info" (id "") or
    "endpoints"; None for a key stablenet does not know."""
    if not key.startswith(hosts_prefix):
        return None
    parts = key[len(hosts_prefix) :].split("/")
    if len(parts) == 2 and parts[1] == "info" and parts[0]:
        return parts[0], "info", ""
    if len(parts) == 3 and parts[1] == "endpoints" and parts[0] and parts[2]:
        return parts[0], "endpoints", parts[2]
    return None


def parse_info(value: bytes) -> HostInfo | None:
    try:
        raw = json.loads(value)
        return HostInfo(str(raw["address"]), int(raw["ttl"]))
    except (ValueError, KeyError, TypeError):
        return None


def parse_endpoint(host: str, value: bytes) -> Endpoint | None:
    """A remote endpoint from its record, marked with its host; None for a malformed one."""
    try:
        raw = json.loads(value)
        state = State(raw["state"])
        target_port = raw.get("target_port")
        return Endpoint(
            id=str(raw["id"]),
            name=str(raw["name"]),
            service=str(raw["service"]),
            address=str(raw["address"]),
            port=int(raw["port"]),
            network=str(raw.get("network", "")),
            addresses=(),
            started_at=float(raw.get("started_at", 0.0)),
            weight=int(raw.get("weight", 1)),
            http_hosts=tuple(str(h) for h in raw.get("http_hosts", ())),
            origin=Origin(
                host=host,
                state=state,
                reason=str(raw.get("reason", "")),
                target_port=None if target_port is None else int(target_port),
            ),
        )
    except (ValueError, KeyError, TypeError):
        return None
