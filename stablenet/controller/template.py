"""A faithful replica: the Engine API body that creates a copy of a template container.

Copied: image (the exact image id), command, entrypoint, env, working dir, user, labels, mounts
(bind mounts and named volumes shared; anonymous volumes come fresh), networks with their
aliases, restart policy, resources, health check and the rest of the host config. Not copied:
hostname, MAC and static IP addresses, and Compose's own labels (a later `docker compose up`
would otherwise remove or adopt the replica); label stablenet.service keeps it in the service
and stablenet.managed says stablenet made it. Pure; no I/O."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from stablenet.controller.spec import COMPOSE, MANAGED
from stablenet.docker.translate import LABEL, container_name

# Config keys that identify one container, not the service.
_NOT_COPIED = frozenset({"Hostname", "MacAddress"})
_DEFAULT_MODES = frozenset({"", "default", "bridge", "host", "none"})


@dataclass(frozen=True, slots=True)
class ReplicaPlan:
    """What to send: the create body (primary network included) and further networks to
    connect before the first start, as (network, endpoint config)."""

    body: Mapping[str, Any]
    networks: tuple[tuple[str, Mapping[str, Any]], ...]


def replica_plan(inspect: Mapping[str, Any], service: str) -> ReplicaPlan:
    config: Mapping[str, Any] = inspect.get("Config") or {}
    host: dict[str, Any] = dict(inspect.get("HostConfig") or {})
    body: dict[str, Any] = {k: v for k, v in config.items() if k not in _NOT_COPIED}
    body["Image"] = str(inspect.get("Image") or config.get("Image") or "")
    labels = {k: v for k, v in (config.get("Labels") or {}).items() if not k.startswith(COMPOSE)}
    labels[LABEL + "service"] = service
    labels[MANAGED] = "true"
    body["Labels"] = labels
    body["HostConfig"] = host
    forget = {
        container_name(inspect),
        str(config.get("Hostname") or ""),
        str(inspect.get("Id") or "")[:12],
    }
    networks: Mapping[str, Any] = (inspect.get("NetworkSettings") or {}).get("Networks") or {}
    mode = str(host.get("NetworkMode") or "")
    endpoints = {name: _endpoint(info or {}, forget) for name, info in networks.items()}
    primary = mode if mode in endpoints else None
    if primary is None and mode in _DEFAULT_MODES and "bridge" in endpoints:
        primary = "bridge"
    if primary is not None:
        body["NetworkingConfig"] = {"EndpointsConfig": {primary: endpoints[primary]}}
    others = tuple(
        (name, ep)
        for name, ep in sorted(endpoints.items())
        if name != primary and not mode.startswith("container:") and mode not in ("host", "none")
    )
    return ReplicaPlan(body, others)


def _endpoint(info: Mapping[str, Any], forget: set[str]) -> dict[str, Any]:
    """A network attachment without what belongs to one container (static IPs, MAC, aliases
    that name the template itself)."""
    endpoint: dict[str, Any] = {}
    aliases = [a for a in info.get("Aliases") or () if a and a not in forget]
    if aliases:
        endpoint["Aliases"] = aliases
    if info.get("Links"):
        endpoint["Links"] = list(info["Links"])
    if info.get("DriverOpts"):
        endpoint["DriverOpts"] = dict(info["DriverOpts"])
    return endpoint
