"""Host routing: exact names and wildcards, the most specific name winning, names remembered
while their service restarts; pure tables first, then once through the proxy."""

from __future__ import annotations

import contextlib

import aiohttp

from stablenet.model import Endpoint, Remove, Upsert
from stablenet.proxy.routes import REMEMBER, Routes, build_routes
from stablenet.registry import Registry
from tests.test_proxy_core import ep as core_ep
from tests.test_proxy_http import endpoint, running_proxy, serve_app, whoami_app

ZONE = "z"


def ep(n: int, service: str, *hosts: str) -> Endpoint:
    return core_ep(n, service=service, http_hosts=hosts)


def table(*endpoints: Endpoint, previous: Routes | None = None, now: float = 0.0) -> Routes:
    registry = Registry()
    registry.apply([Upsert(e) for e in endpoints])
    return build_routes(registry.snapshot, ZONE, previous, now=now)


def test_most_specific_name_wins() -> None:
    routes = table(
        ep(1, "wild", "*.example.com"),
        ep(2, "deep", "*.b.example.com"),
        ep(3, "exact", "a.b.example.com"),
        ep(4, "tld", "*.com"),
    )
    for host, service in [
        ("x.example.com", "wild"),
        ("x.y.example.com", "wild"),  # one or more leading labels
        ("b.example.com", "wild"),  # *.b.example.com needs a label before b
        ("x.b.example.com", "deep"),  # the longer suffix
        ("x.y.b.example.com", "deep"),
        ("a.b.example.com", "exact"),  # an exact name beats every wildcard
        ("z.a.b.example.com", "deep"),  # an exact name covers nothing below it
        ("example.com", "tld"),  # *.example.com does not cover example.com itself
        ("com", None),
        ("x.example.org", None),
        ("wild.z", "wild"),
    ]:
        assert routes.service_for(host) == service, host


def test_a_wildcard_needs_a_leading_label() -> None:
    routes = table(ep(1, "wild", "*.example.com"))
    assert routes.service_for("example.com") is None
    assert routes.service_for(".example.com") is None
    assert routes.service_for("a.example.com") == "wild"


def test_zone_names_beat_a_wildcard_over_the_zone() -> None:
    routes = table(ep(1, "web"), ep(2, "catchall", "*.z"))
    assert routes.service_for("web.z") == "web"
    assert routes.service_for("other.z") == "catchall"
    assert routes.service_for("x.web.z") == "catchall"


def test_same_wildcard_twice_first_service_by_name_wins() -> None:
    routes = table(ep(1, "zeta", "*.example.com"), ep(2, "alpha", "*.example.com"))
    assert routes.service_for("a.example.com") == "alpha"


def test_a_restarting_services_wildcard_is_remembered() -> None:
    wild = ep(1, "wild", "*.example.com")
    routes = table(wild, ep(2, "other"))
    later = table(ep(2, "other"), previous=routes, now=10.0)  # wild's only container is gone
    assert later.service_for("a.example.com") == "wild"  # held, not 404
    still = table(ep(2, "other"), previous=later, now=10.0 + REMEMBER - 1)
    assert still.service_for("a.b.example.com") == "wild"
    forgotten = table(ep(2, "other"), previous=still, now=10.0 + REMEMBER + 1)
    assert forgotten.service_for("a.example.com") is None


def test_a_remembered_name_keeps_its_rank() -> None:
    """A restarting service keeps its exact name (and its longer wildcard) from another
    service's wildcard, and loses them to a current name of the same rank."""
    shop, deep = ep(1, "shop", "shop.example.com"), ep(2, "deep", "*.b.example.com")
    wild = ep(3, "wild", "*.example.com")
    routes = table(shop, deep, wild)
    later = table(wild, previous=routes, now=10.0)
    assert later.service_for("shop.example.com") == "shop"
    assert later.service_for("x.b.example.com") == "deep"
    assert later.service_for("x.example.com") == "wild"
    taken = table(wild, ep(4, "new", "shop.example.com"), previous=later, now=11.0)
    assert taken.service_for("shop.example.com") == "new"


async def test_wildcards_route_through_the_proxy() -> None:
    registry = Registry()
    async with contextlib.AsyncExitStack() as stack:
        wild = await stack.enter_async_context(serve_app(whoami_app("wild")))
        deep = await stack.enter_async_context(serve_app(whoami_app("deep")))
        registry.apply([Upsert(endpoint(wild, 1, "wild", http_hosts=("*.example.com",)))])
        _, url = await stack.enter_async_context(running_proxy(registry, hold_timeout=0.2))
        http = await stack.enter_async_context(aiohttp.ClientSession())

        async def get(host: str) -> tuple[int, str]:
            async with http.get(url + "/", headers={"Host": host}) as resp:
                return resp.status, await resp.text()

        assert await get("A.Example.com:80") == (200, "wild")
        assert await get("x.b.example.com") == (200, "wild")
        status, text = await get("example.com")
        assert status == 404 and "example.com" in text
        # A more specific wildcard arrives: the same Host, seen before, now goes there.
        deep_ep = endpoint(deep, 2, "deep", http_hosts=("*.b.example.com",))
        registry.apply([Upsert(deep_ep)])
        assert await get("x.b.example.com") == (200, "deep")
        assert await get("x.example.com") == (200, "wild")
        # Its only container goes away: its hosts are held for it (then 503), not sent to wild.
        registry.apply([Remove(deep_ep.id)])
        status, _ = await get("x.b.example.com")
        assert status == 503
        assert await get("x.example.com") == (200, "wild")
