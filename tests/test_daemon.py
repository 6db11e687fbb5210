"""Daemon wiring: what the parts learn from each other's configuration. The daemon is built
inside a running loop, as `stablenet run` builds it."""

from __future__ import annotations

import dataclasses

from stablenet import config
from stablenet.daemon import Daemon
from stablenet.model import Upsert
from tests.test_dns_core import LOOPBACK, addresses, ask, web_registry


async def test_dedicated_proxy_listener_gives_the_service_a_stable_dns_answer() -> None:
    cfg = config.parse(
        '[dns]\nlisten = ["127.0.0.1:15353"]\n'
        '[proxy]\nlisten = "127.0.0.1:18080"\n'
        'listeners = ["web=http:169.254.100.9:80", "db=tcp:0.0.0.0:5432"]\n',
        env={},
    )
    reg = web_registry()
    daemon = Daemon(cfg, registry=reg)
    assert daemon.dns is not None and daemon.proxy is not None
    daemon.proxy.refresh(reg.snapshot)  # what the running proxy does for every snapshot
    resolver = daemon.dns.resolver
    resolver.set_allow(LOOPBACK)  # the server sets it when it starts listening
    assert addresses(ask(resolver, reg.snapshot, "web.stablenet.internal")) == {"169.254.100.9"}
    # A wildcard listener has no single address to give: the endpoints are answered.
    assert addresses(ask(resolver, reg.snapshot, "db.stablenet.internal")) == {"172.17.0.9"}


async def test_disabled_parts_are_not_built() -> None:
    cfg = config.parse(
        "[dns]\nenabled = false\n[proxy]\nenabled = false\n[controller]\nenabled = false\n",
        env={},
    )
    daemon = Daemon(cfg)
    assert daemon.dns is None and daemon.proxy is None and daemon.controller is None
    assert [type(x).__name__ for x in daemon.listeners()] == ["AdminServer"]
    # Traffic history keeps ready replicas without the proxy; its request figures stay empty.
    assert set(daemon.loops()) == {"docker-source", "health", "events", "traffic"}
    enabled = Daemon(config.parse("", env={}))
    assert "controller" in enabled.loops()


async def test_a_label_declared_listener_gives_a_stable_dns_answer_too() -> None:
    cfg = config.parse(
        '[dns]\nlisten = ["127.0.0.1:15353"]\n[proxy]\nlisten = "127.0.0.1:18080"\n', env={}
    )
    reg = web_registry()
    daemon = Daemon(cfg, registry=reg)
    assert daemon.dns is not None and daemon.proxy is not None
    db = reg.snapshot.by_name["db"]
    reg.apply([Upsert(dataclasses.replace(db, listeners=("tcp:169.254.100.12:5432",)))])
    daemon.proxy.refresh(reg.snapshot)  # what the running proxy does for every snapshot
    assert daemon.proxy.stable_addresses() == {"db": ("169.254.100.12",)}
    daemon.dns.resolver.set_allow(LOOPBACK)
    answer = ask(daemon.dns.resolver, reg.snapshot, "db.stablenet.internal")
    assert addresses(answer) == {"169.254.100.12"}
