"""Docker JSON -> registry vocabulary, on JSON fixtures shaped like the Engine API's."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from stablenet.config import HealthConfig
from stablenet.docker.translate import (
    Action,
    LabelError,
    Settings,
    classify,
    endpoint_from_inspect,
    event_signal,
    event_time,
    signal_number,
    stops,
)
from stablenet.model import State

SETTINGS = Settings()


def inspect(
    name: str = "web-1",
    labels: dict[str, str] | None = None,
    networks: dict[str, str] | None = None,
    exposed: list[str] | None = None,
    running: bool = True,
    health: str | None = None,
    mode: str = "bridge",
) -> dict[str, Any]:
    nets = {"bridge": "172.17.0.2"} if networks is None else networks
    state: dict[str, Any] = {
        "Status": "running" if running else "exited",
        "Running": running,
        "Paused": False,
        "Restarting": False,
        "Pid": 4242,
        "StartedAt": "2026-11-28T06:42:57.275724022Z",
    }
    if health is not None:
        state["Health"] = {"Status": health, "FailingStreak": 0, "Log": []}
    return {
        "Id": "c0ffee" + "0" * 58,
        "Name": "/" + name,
        "State": state,
        "Config": {
            "Labels": labels or {},
            "ExposedPorts": {p: {} for p in (exposed or [])},
            "Image": "stablenet-test/busybox:1",
        },
        "HostConfig": {"NetworkMode": mode},
        "NetworkSettings": {
            "Networks": {
                net: {"IPAddress": ip, "GlobalIPv6Address": "", "NetworkID": net * 2}
                for net, ip in nets.items()
            }
        },
    }


def test_service_name_precedence() -> None:
    assert endpoint_from_inspect(inspect(), SETTINGS).service == "web-1"  # type: ignore[union-attr]
    compose = {"com.docker.compose.service": "api"}
    assert endpoint_from_inspect(inspect(labels=compose), SETTINGS).service == "api"  # type: ignore[union-attr]
    both = {**compose, "stablenet.service": "Shop"}
    assert endpoint_from_inspect(inspect(labels=both), SETTINGS).service == "shop"  # type: ignore[union-attr]


def test_container_names_become_dns_safe_services() -> None:
    ep = endpoint_from_inspect(inspect(name="my.app_1"), SETTINGS)
    assert ep is not None and ep.service == "my-app_1" and ep.name == "my.app_1"


def test_fields_from_inspect() -> None:
    ep = endpoint_from_inspect(inspect(exposed=["8080/tcp", "443/tcp", "53/udp"]), SETTINGS)
    assert ep is not None
    assert ep.address == "172.17.0.2"
    assert ep.port == 443  # the lowest exposed TCP port
    assert ep.network == "bridge"
    assert ep.state is State.READY
    started = datetime(2026, 11, 28, 6, 42, 57, 275724, tzinfo=UTC).timestamp()
    assert ep.started_at == pytest.approx(started, abs=1e-6)


def test_port_label_wins_over_exposed() -> None:
    ep = endpoint_from_inspect(
        inspect(labels={"stablenet.port": "9000"}, exposed=["80/tcp"]), SETTINGS
    )
    assert ep is not None and ep.port == 9000


@pytest.mark.parametrize(
    ("label", "value", "expected"),
    [
        ("stablenet.port", "abc", "label stablenet.port='abc' is not valid: expected a port"),
        ("stablenet.port", "70000", "label stablenet.port='70000' is not valid"),
        ("stablenet.weight", "-3", "label stablenet.weight='-3' is not valid"),
        ("stablenet.enable", "maybe", "label stablenet.enable='maybe' is not valid"),
        ("stablenet.service", "no spaces", "label stablenet.service='no spaces'"),
        ("stablenet.network", "elsewhere", "not on that network (it is on: bridge)"),
        ("stablenet.health.interval", "often", "label stablenet.health.interval='often'"),
        ("stablenet.health.rise", "0", "label stablenet.health.rise='0'"),
        ("stablenet.health.path", "healthz", "expected a path starting with /"),
        ("stablenet.health.paht", "/x", "unknown health label"),
        ("stablenet.http.host", "bad host!", "'bad host!' is not a host name"),
        ("stablenet.http.host", "*", "'*' alone is not a wildcard; name a suffix"),
        ("stablenet.http.host", "ok.example, a*.b", "'a*.b': '*' may only stand for the leading"),
        ("stablenet.http.host", "*.*.x", "'*.*.x': '*' may only stand for the leading labels"),
        ("stablenet.http.host", "x.*.y", "'x.*.y': '*' may only stand for the leading labels"),
        ("stablenet.http.host", "*.", "'*' alone is not a wildcard"),
        ("stablenet.http.host", "*.a..b", "'*.a..b' is not a host name"),
        ("stablenet.health.rise", "\u00b2", "expected a whole number from 1 to 100"),
        ("stablenet.proxy.listen", "udp:10.0.0.1:53", "expected http:HOST:PORT or tcp:HOST:PORT"),
        ("stablenet.proxy.listen", "tcp:nowhere:6379", "'nowhere' is not an IP address"),
        ("stablenet.health.status", "\u00b2\u00b2\u00b2", "expected a status or range"),
        ("stablenet.health.path", "/\u20ac", "expected a path starting with / (ASCII"),
    ],
)
def test_bad_labels_name_container_label_and_value(label: str, value: str, expected: str) -> None:
    with pytest.raises(LabelError) as info:
        endpoint_from_inspect(
            inspect(labels={label: value, "stablenet.port": "80"} | {label: value}), SETTINGS
        )
    assert str(info.value).startswith("container web-1: ")
    assert expected in str(info.value)


def test_network_choice_is_sorted_then_configured_then_label() -> None:
    nets = {"zeta": "10.1.0.2", "alpha": "10.2.0.2", "mid": "10.3.0.2"}
    ep = endpoint_from_inspect(inspect(networks=nets), SETTINGS)
    assert ep is not None and (ep.network, ep.address) == ("alpha", "10.2.0.2")
    assert set(ep.addresses) == set(nets.values())
    ep = endpoint_from_inspect(inspect(networks=nets), Settings(network="mid"))
    assert ep is not None and ep.network == "mid"
    ep = endpoint_from_inspect(inspect(networks=nets), Settings(network="absent"))
    assert ep is not None and ep.network == "alpha"
    labelled = inspect(networks=nets, labels={"stablenet.network": "zeta"})
    ep = endpoint_from_inspect(labelled, Settings(network="mid"))
    assert ep is not None and (ep.network, ep.address) == ("zeta", "10.1.0.2")


def test_not_registered() -> None:
    assert endpoint_from_inspect(inspect(running=False), SETTINGS) is None
    assert endpoint_from_inspect(inspect(labels={"stablenet.enable": "false"}), SETTINGS) is None
    assert endpoint_from_inspect(inspect(networks={}, mode="none"), SETTINGS) is None
    opt_in = Settings(exposed_by_default=False)
    assert endpoint_from_inspect(inspect(), opt_in) is None
    assert endpoint_from_inspect(inspect(labels={"stablenet.enable": "true"}), opt_in) is not None


def test_host_network_uses_loopback() -> None:
    ep = endpoint_from_inspect(inspect(networks={}, mode="host", exposed=["80/tcp"]), SETTINGS)
    assert ep is not None and ep.address == "127.0.0.1" and ep.network == "host"


def test_health_labels_and_docker_health() -> None:
    labels = {
        "stablenet.port": "80",
        "stablenet.health.path": "/healthz",
        "stablenet.health.interval": "500ms",
        "stablenet.health.fall": "2",
    }
    ep = endpoint_from_inspect(inspect(labels=labels), Settings(health=HealthConfig()))
    assert ep is not None and ep.check is not None
    assert (ep.check.path, ep.check.interval, ep.check.fall, ep.check.rise) == (
        "/healthz",
        0.5,
        2,
        1,
    )
    assert ep.check.timeout == 0.5  # never longer than the interval
    assert ep.state is State.STARTING
    tcp = endpoint_from_inspect(
        inspect(labels={"stablenet.port": "80", "stablenet.health.rise": "2"}), SETTINGS
    )
    assert tcp is not None and tcp.check is not None and tcp.check.path is None
    assert endpoint_from_inspect(inspect(health="starting"), SETTINGS).state is State.STARTING  # type: ignore[union-attr]
    assert endpoint_from_inspect(inspect(health="healthy"), SETTINGS).state is State.READY  # type: ignore[union-attr]
    assert endpoint_from_inspect(inspect(health="unhealthy"), SETTINGS).state is State.UNHEALTHY  # type: ignore[union-attr]


def test_health_check_needs_a_port() -> None:
    with pytest.raises(LabelError, match="no port is known"):
        endpoint_from_inspect(inspect(labels={"stablenet.health.path": "/"}), SETTINGS)


def event(kind: str, action: str, cid: str = "abc", **attrs: str) -> dict[str, Any]:
    return {
        "Type": kind,
        "Action": action,
        "Actor": {"ID": cid, "Attributes": attrs},
        "time": 1795761777,
        "timeNano": 1795761777275724022,
    }


@pytest.mark.parametrize(
    ("evt", "expected"),
    [
        (event("container", "kill", signal="15"), (Action.DRAIN, "abc")),
        (event("container", "kill", signal="9"), (Action.DRAIN, "abc")),
        # HUP: a stop only if it is the container's own STOPSIGNAL (checked by the source)
        (event("container", "kill", signal="1"), (Action.SIGNAL, "abc")),
        (event("container", "stop"), (Action.DRAIN, "abc")),
        (event("container", "die", exitCode="0"), (Action.REMOVE, "abc")),
        (event("container", "destroy"), (Action.REMOVE, "abc")),
        (event("container", "pause"), (Action.REMOVE, "abc")),
        (event("container", "start"), (Action.INSPECT, "abc")),
        (event("container", "unpause"), (Action.INSPECT, "abc")),
        (event("container", "rename", oldName="/x"), (Action.INSPECT, "abc")),
        (event("container", "health_status: healthy"), (Action.INSPECT, "abc")),
        (event("container", "exec_create: sh -c true"), None),
        (event("container", "create"), None),
        (event("network", "connect", cid="netid", container="abc"), (Action.INSPECT, "abc")),
        (event("network", "disconnect", cid="netid", container="abc"), (Action.INSPECT, "abc")),
        (event("network", "create", cid="netid"), None),
        (event("image", "pull", cid="busybox"), None),
        ({"Type": "container", "Action": "start"}, None),  # no actor: ignored, not a crash
    ],
)
def test_classify_events(evt: dict[str, Any], expected: tuple[Action, str] | None) -> None:
    assert classify(evt) == expected


def test_proxy_listen_label() -> None:
    labels = {"stablenet.proxy.listen": "tcp:169.254.100.5:6379, http:169.254.100.5:8080"}
    ep = endpoint_from_inspect(inspect(labels=labels), SETTINGS)
    assert ep is not None
    assert ep.listeners == ("tcp:169.254.100.5:6379", "http:169.254.100.5:8080")


def test_stop_signal_matching() -> None:
    assert signal_number("SIGWINCH") == signal_number("WINCH") == signal_number("28") == 28
    assert signal_number("NOPE") is None
    assert stops(event_signal(event("container", "kill", signal="28")), "SIGWINCH")
    assert not stops(event_signal(event("container", "kill", signal="1")), "SIGWINCH")
    assert not stops(event_signal(event("container", "kill", signal="28")), "")
    ep = endpoint_from_inspect(inspect() | {"Config": {"StopSignal": "SIGWINCH"}}, SETTINGS)
    assert ep is not None and ep.stop_signal == "SIGWINCH"


@pytest.mark.parametrize(
    ("value", "expected"), [(None, None), (0, 0.0), (3, 3.0), (-1, None), ("x", None)]
)
def test_stop_timeout_from_inspect(value: object, expected: float | None) -> None:
    """The container's own StopTimeout (docker run --stop-timeout) bounds how long a drain
    waits for the container to exit; None means Docker's default."""
    data = inspect()
    if value is not None:
        data["Config"]["StopTimeout"] = value
    ep = endpoint_from_inspect(data, SETTINGS)
    assert ep is not None and ep.stop_timeout == expected


def test_event_time_prefers_nanoseconds() -> None:
    assert event_time(event("container", "start")) == pytest.approx(1795761777.275724)
    assert event_time({"time": 5}) == 5.0
