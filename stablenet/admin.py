"""Admin API (aiohttp): the registry as JSON, liveness and readiness, recent events, Prometheus
metrics, the status page, and one write: a managed service's count (POST
/v1/services/{name}/scale). Bound to loopback by default, and guarded by a bearer token whenever
one is configured; the write also needs a JSON body, which a browser cannot send across origins
without asking first."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from stablenet.controller import Controller
from stablenet.controller.spec import MAX_REPLICAS
from stablenet.errors import StartupError
from stablenet.events import EventLog
from stablenet.lifecycle import Server
from stablenet.model import Endpoint
from stablenet.registry import Registry, Snapshot
from stablenet.status import PAGE
from stablenet.traffic import History
from stablenet.units import parse_hostport

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ServiceInfo = Mapping[str, Callable[[str], Any]]
"""Further keys of a service's JSON, each from a part that knows it (e.g. "vip")."""
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/"})  # "/" is the page; its data is guarded


def endpoint_json(ep: Endpoint, now: float) -> dict[str, Any]:
    verdict = ep.verdict
    return {
        "id": ep.id,
        "name": ep.name,
        "service": ep.service,
        "host": ep.host,  # "" for this host, else the cluster host the container runs on
        "address": ep.address,
        "port": ep.port,
        "network": ep.network,
        "addresses": list(ep.addresses),
        "address6": ep.address6,
        "state": ep.state.value,
        "reason": ep.reason,
        "weight": ep.weight,
        "http_hosts": list(ep.http_hosts),
        "started_at": ep.started_at,
        "age_seconds": round(max(0.0, now - ep.started_at), 3) if ep.started_at else None,
        "health": {
            "check": None
            if ep.check is None
            else {
                "type": "http" if ep.check.path else "tcp",
                "path": ep.check.path,
                "interval": ep.check.interval,
                "timeout": ep.check.timeout,
                "rise": ep.check.rise,
                "fall": ep.check.fall,
            },
            "docker": ep.docker_health,
            "last": None
            if verdict is None
            else {"passing": verdict.passing, "reason": verdict.reason, "at": verdict.at},
        },
        "labels": dict(ep.labels),
    }


def service_json(
    name: str,
    snap: Snapshot,
    now: float,
    managed: dict[str, Any] | None = None,
    info: ServiceInfo | None = None,
) -> dict[str, Any]:
    endpoints = snap.services.get(name, ())
    body = {
        "name": name,
        "ready": len(snap.ready.get(name, ())),
        "endpoints": [endpoint_json(ep, now) for ep in endpoints],
        "controller": managed,
    }
    for key, part in (info or {}).items():
        body[key] = part(name)
    return body


def services_json(
    snap: Snapshot,
    now: float,
    managed: dict[str, dict[str, Any]] | None = None,
    info: ServiceInfo | None = None,
) -> dict[str, Any]:
    """Every service with endpoints, and every managed one (which may have none running)."""
    managed = managed or {}
    names = sorted(set(snap.services) | set(managed))
    return {
        "version": snap.version,
        "synced": snap.synced,
        "services": [service_json(name, snap, now, managed.get(name), info) for name in names],
        "problems": [{"id": cid, "message": msg} for cid, msg in sorted(snap.problems.items())],
    }


class AdminServer(Server):
    """The admin HTTP server as an async context manager. Other parts may add routes before
    it starts (``add_get``)."""

    def __init__(
        self,
        registry: Registry,
        listen: str,
        token: str = "",
        events: EventLog | None = None,
        metrics: Callable[[], bytes] | None = None,
        controller: Controller | None = None,
        service_info: ServiceInfo | None = None,
    ) -> None:
        super().__init__()
        self._info = service_info
        self._registry = registry
        self._controller = controller
        self._events = events
        self._metrics = metrics
        self._host, self._port = parse_hostport(listen)
        self._listen = listen
        self._token = token
        self._app = web.Application(middlewares=[self._auth])
        self._app.router.add_get("/healthz", self._healthz)
        self._app.router.add_get("/readyz", self._readyz)
        self._app.router.add_get("/v1/services", self._services)
        self._app.router.add_get("/v1/services/{name}", self._service)
        self._app.router.add_post("/v1/services/{name}/scale", self._scale)
        self._app.router.add_get("/v1/events", self._recent_events)
        self._app.router.add_get("/metrics", self._metrics_text)
        self._app.router.add_get("/", self._status_page)
        self._runner: web.AppRunner | None = None
        self.port = self._port
        # Other parts' status by name (e.g. "cluster"), added to /readyz and /v1/services.
        self.status: dict[str, Callable[[], dict[str, Any]]] = {}

    def add_get(self, path: str, handler: Handler) -> None:
        self._app.router.add_get(path, handler)

    def serve_traffic(self, history: History) -> None:
        """GET /v1/traffic?since=TICK and /v1/services/{name}/traffic: per-second history."""

        def since(request: web.Request) -> int:
            try:
                return max(0, int(request.query.get("since", "0")))
            except ValueError:
                raise web.HTTPBadRequest(
                    text='{"error": "since: expected the tick of an earlier answer"}',
                    content_type="application/json",
                ) from None

        async def everything(request: web.Request) -> web.StreamResponse:
            pieces = history.chunks(since(request))
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            await response.prepare(request)
            for piece in pieces:  # a long history of many services must not hold the loop
                await response.write(piece.encode())
                await asyncio.sleep(0)
            await response.write_eof()
            return response

        async def one(request: web.Request) -> web.Response:
            name = request.match_info["name"].lower()
            body = history.samples(name, since(request))
            if body is None:
                return web.json_response({"error": f"no traffic for {name!r}"}, status=404)
            return web.json_response({"service": name, "tick": history.tick, **body})

        self.add_get("/v1/traffic", everything)
        self.add_get("/v1/services/{name}/traffic", one)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._token and request.path not in OPEN_PATHS:
            given = request.headers.get("Authorization", "")
            expected = f"Bearer {self._token}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                return web.json_response(
                    {"error": "missing or wrong bearer token"},
                    status=401,
                    headers={"WWW-Authenticate": 'Bearer realm="stablenet"'},
                )
        return await handler(request)

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def _readyz(self, request: web.Request) -> web.Response:
        snap = self._registry.snapshot
        body: dict[str, Any] = {"ready": snap.synced, "version": snap.version}
        if not snap.synced:
            body["reason"] = "not synced with the Docker Engine"
        body.update((name, report()) for name, report in self.status.items())
        return web.json_response(body, status=200 if snap.synced else 503)

    def _managed(self) -> dict[str, dict[str, Any]]:
        return self._controller.services() if self._controller is not None else {}

    async def _services(self, request: web.Request) -> web.Response:
        body = services_json(self._registry.snapshot, time.time(), self._managed(), self._info)
        body.update((name, report()) for name, report in self.status.items())
        return web.json_response(body)

    async def _service(self, request: web.Request) -> web.Response:
        name = request.match_info["name"].lower()
        snap = self._registry.snapshot
        managed = self._managed()
        if name not in snap.services and name not in managed:
            return web.json_response({"error": f"no service named {name!r}"}, status=404)
        return web.json_response(
            service_json(name, snap, time.time(), managed.get(name), self._info)
        )

    async def _scale(self, request: web.Request) -> web.Response:
        """POST {"replicas": N}: set a managed service's count; it persists across restarts."""
        if request.content_type != "application/json":
            return web.json_response(
                {"error": 'send a JSON body {"replicas": N} with Content-Type: application/json'},
                status=415,
            )
        try:
            body = await request.json()
            replicas = body["replicas"]
            if isinstance(replicas, bool) or not isinstance(replicas, int):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return web.json_response(
                {"error": 'expected a JSON body {"replicas": N} with N a whole number'},
                status=400,
            )
        if not 0 <= replicas <= MAX_REPLICAS:
            return web.json_response(
                {"error": f"replicas: expected a whole number from 0 to {MAX_REPLICAS}"},
                status=400,
            )
        if self._controller is None:
            return web.json_response(
                {"error": "the controller is off (controller.enabled = false)"}, status=409
            )
        name = request.match_info["name"].lower()
        refused = self._controller.scale(name, replicas)
        if refused is not None:
            status = 404 if refused.startswith("no managed service") else 409
            return web.json_response({"error": refused}, status=status)
        return web.json_response({"service": name, "replicas": replicas})

    async def _recent_events(self, request: web.Request) -> web.Response:
        try:
            since = int(request.query.get("since", "0"))
        except ValueError:
            return web.json_response({"error": "since: expected a whole number"}, status=400)
        events = self._events.since(since) if self._events is not None else []
        return web.json_response({"events": [e.as_dict() for e in events]})

    async def _metrics_text(self, request: web.Request) -> web.Response:
        if self._metrics is None:
            return web.json_response({"error": "metrics are not enabled"}, status=404)
        return web.Response(
            body=self._metrics(), headers={"Content-Type": "text/plain; version=0.0.4"}
        )

    async def _status_page(self, request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    async def start(self) -> None:
        runner = web.AppRunner(self._app, access_log=None, handle_signals=False)
        await runner.setup()
        sock = self.sockets("tcp", self._host, self._port)  # bound early or inherited
        site: web.BaseSite = (
            web.SockSite(runner, sock)
            if sock is not None
            else web.TCPSite(runner, self._host, self._port, reuse_address=True)
        )
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise StartupError(
                f"admin.listen: cannot listen on {self._listen}: {exc.strerror or exc}"
            ) from None
        self._runner = runner
        if runner.addresses:
            self.port = int(runner.addresses[0][1])
        logger.info("admin API listening on %s:%d", self._host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
