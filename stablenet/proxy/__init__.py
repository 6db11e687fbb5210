"""The load-balancing reverse proxy: HTTP routed by Host on a fixed virtual address, plus
dedicated HTTP or plain TCP listeners per service. ``Proxy`` (server.py) owns the listeners and
the lifecycle; dispatch.py decides where requests go; the request path is asyncio Protocols +
llhttp (client.py, upstream.py), with a request's phases in exchange.py and the retry rules in
retry.py; balancing (balance.py) and Host routing (routes.py) are pure. Reads the registry, never
writes it; knows nothing of Docker."""

from stablenet import native

__path__ = native.extend(__name__, __path__)

from stablenet.proxy.server import Counters, OutcomeHook, Proxy, no_outcome  # noqa: E402

__all__ = ["Counters", "OutcomeHook", "Proxy", "no_outcome"]
