"""What a service asks of the controller, read from its containers' labels, and what cannot be
replicated safely. Pure functions over Docker's JSON; no I/O."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from stablenet.docker.translate import LABEL, LabelError, container_name

REPLICAS = LABEL + "replicas"
HEAL = LABEL + "heal"
MANAGED = LABEL + "managed"  # set on the replicas stablenet creates
COMPOSE = "com.docker.compose."
MAX_REPLICAS = 1000
HEAL_MODES = ("replace", "restart")


@dataclass(frozen=True, slots=True)
class Spec:
    """A service's request: a count to keep (None: heal only) and how to heal."""

    replicas: int | None
    heal: str


# Any of these puts a service under the controller (the last three: autoscaling).
MANAGING = (REPLICAS, HEAL, LABEL + "replicas.min", LABEL + "replicas.max", LABEL + "scale.target")


def is_managed(labels: Mapping[str, str]) -> bool:
    """Whether a container asks for the controller at all: nothing else is ever touched."""
    return any(label in labels for label in MANAGING)


def spec_of(labels: Mapping[str, str], name: str, default_heal: str) -> Spec:
    """The Spec a container's labels declare. Raises LabelError naming the label and the fix."""
    replicas: int | None = None
    if REPLICAS in labels:
        text = labels[REPLICAS].strip()
        if not (text.isascii() and text.isdigit()) or int(text) > MAX_REPLICAS:
            raise LabelError(
                f"container {name}: label {REPLICAS}={labels[REPLICAS]!r} is not valid: "
                f"expected a whole number from 0 to {MAX_REPLICAS}"
            )
        replicas = int(text)
    heal = default_heal
    if HEAL in labels:
        heal = labels[HEAL].strip().lower()
        if heal not in HEAL_MODES:
            raise LabelError(
                f"container {name}: label {HEAL}={labels[HEAL]!r} is not valid: "
                "expected replace or restart"
            )
    return Spec(replicas, heal)


def creates_containers(spec: Spec) -> bool:
    """Whether keeping this spec needs containers beside the existing one (so the template
    must be replicable): a count above one, or healing by replacement."""
    return spec.heal == "replace" or (spec.replicas is not None and spec.replicas > 1)


def unreplicable(inspect: Mapping[str, Any]) -> str | None:
    """Why a copy of this container could not run beside it, or None when it can."""
    host = inspect.get("HostConfig") or {}
    mode = str(host.get("NetworkMode") or "")
    if mode == "host" or mode.startswith("container:"):
        return (
            f"it uses network mode {mode!r}: replicas would share one network stack and fight "
            "over its ports; put it on a bridge or user-defined network"
        )
    for port, bindings in sorted((host.get("PortBindings") or {}).items()):
        for binding in bindings or ():
            fixed = str((binding or {}).get("HostPort") or "")
            if fixed and fixed != "0":
                return (
                    f"it publishes fixed host port {fixed} (container port {port}): a second "
                    "replica could not bind it; publish without a host port, or reach the "
                    "service through stablenet's proxy"
                )
    labels: Mapping[str, str] = (inspect.get("Config") or {}).get("Labels") or {}
    project = labels.get(COMPOSE + "project")
    service = labels.get(COMPOSE + "service")
    name = container_name(inspect)
    if project and service:
        generated = re.compile(
            rf"^{re.escape(project)}[-_]{re.escape(service)}[-_]\d+$", re.IGNORECASE
        )
        if not generated.match(name):
            return (
                f"it has a fixed name ({name!r}, Compose's container_name): other replicas could "
                "not share it and whatever uses it would reach one of them; remove container_name"
            )
    return None
