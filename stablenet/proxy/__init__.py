"""The load-balancing reverse proxy: HTTP routed by Host on a fixed virtual address, plus
dedicated HTTP or plain TCP listeners per service. ``Proxy`` is the runtime (server.py); the
request path is asyncio Protocols + llhttp (http.py); balancing (balance.py) and Host routing
(routes.py) are pure. Reads the registry, never writes it; knows nothing of Docker."""

from stablenet import native

__path__ = native.extend(__name__, __path__)

from stablenet.proxy.server import Counters, OutcomeHook, Proxy, no_outcome  # noqa: E402

__all__ = ["Counters", "OutcomeHook", "Proxy", "no_outcome"]
