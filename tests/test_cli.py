"""The command line and the daemon as a user runs them: real processes, real HTTP clients,
a real engine."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from stablenet import native
from stablenet.cli import render_table
from tests.helpers import Containers, asked_until, free_port, ip_of, off_loop

ROOT = Path(__file__).resolve().parent.parent
STABLENET = [sys.executable, "-m", "stablenet"]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*STABLENET, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def test_version_says_which_build_of_the_request_path_runs() -> None:
    result = cli("version")
    assert result.returncode == 0
    name, build = result.stdout.splitlines()
    assert name.startswith("stablenet 0.")
    expected = "compiled (mypyc)" if native.enabled() else "pure Python"
    assert build == f"request path: {expected}"
    pure = cli("version", env={"STABLENET_PURE": "1"})
    assert pure.stdout.splitlines()[1] == "request path: pure Python"


def test_check_config_accepts_shipped_file() -> None:
    result = cli("check-config", "--config", "config/stablenet.toml")
    assert result.returncode == 0, result.stderr
    assert "config OK" in result.stdout


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"STABLENET_PROXY_LISTEN": "0.0.0.0:99999"}, "expected a port number (1-65535)"),
        ({"STABLENET_DNS_TTL": "forever"}, "STABLENET_DNS_TTL (dns.ttl): 'forever'"),
    ],
)
def test_check_config_rejects_bad_values_in_one_line(env: dict[str, str], expected: str) -> None:
    result = cli("check-config", env=env)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[docker]\nresync_interval = "often"\n')
    result = cli("check-config", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "stablenet: config error: docker.resync_interval: 'often' is not valid: "
        "expected a duration such as 500ms, 2s, 1m or 1h"
    )


def test_run_refuses_public_admin_without_token() -> None:
    result = cli("run", env={"STABLENET_ADMIN_LISTEN": "0.0.0.0:9180"})
    assert result.returncode == 2
    assert "admin.token is empty" in result.stderr
    assert "Traceback" not in result.stderr


def test_services_without_daemon_says_what_to_do() -> None:
    result = cli("services", "--admin", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert "cannot reach the admin API" in result.stderr


def test_table_rendering() -> None:
    body = {
        "synced": False,
        "services": [
            {
                "name": "web",
                "endpoints": [
                    {
                        "name": "web-1",
                        "address": "172.17.0.2",
                        "port": 80,
                        "state": "ready",
                        "age_seconds": 3725,
                        "reason": "running",
                    },
                    {
                        "name": "web-2",
                        "address": "172.17.0.3",
                        "port": None,
                        "state": "draining",
                        "age_seconds": None,
                        "reason": "container is stopping",
                    },
                ],
            }
        ],
        "problems": [{"id": "x", "message": "container bad: label stablenet.port='abc' ..."}],
    }
    plain = render_table(body).splitlines()
    assert plain[0].split() == ["SERVICE", "ENDPOINT", "ADDRESS", "STATE", "AGE", "REASON"]
    assert plain[1].split() == ["web", "web-1", "172.17.0.2:80", "ready", "1h02m", "running"]
    assert plain[2].split()[:5] == ["web", "web-2", "172.17.0.3", "draining", "-"]
    assert "not synced" in plain[3]
    assert plain[4].startswith("skipped: container bad")
    coloured = render_table(body, colour=True)
    assert "\x1b[32mready" in coloured and "\x1b[" not in render_table(body)


@dataclass
class RunningDaemon:
    proc: asyncio.subprocess.Process
    admin: str
    env: dict[str, str]
    log: list[str]
    dns_port: int = 0  # with serving=True: DNS and the proxy on loopback ports
    proxy_port: int = 0


async def wait_for_line(proc: asyncio.subprocess.Process, needle: str, log: list[str]) -> None:
    await wait_for_lines(proc, [needle], log)


async def wait_for_lines(
    proc: asyncio.subprocess.Process, needles: list[str], log: list[str]
) -> None:
    """Read the daemon's log until each needle has appeared, in whatever order (lines read
    while waiting are consumed, so waiting for them one by one would miss an early one)."""
    assert proc.stderr is not None
    missing = set(needles)
    async with asyncio.timeout(30):
        while missing:
            line = (await proc.stderr.readline()).decode()
            if not line:
                raise AssertionError("daemon exited early:\n" + "".join(log))
            log.append(line)
            missing = {needle for needle in missing if needle not in line}


async def start_daemon(
    *args: str,
    env: dict[str, str] | None = None,
    serving: bool = False,
    preexec_fn: Callable[[], None] | None = None,
) -> RunningDaemon:
    """The daemon as a user runs it, admin on a free loopback port; with ``serving``, DNS and
    the proxy on free loopback ports too (else both off). ``preexec_fn`` runs in the child
    before stablenet (to set resource limits, say)."""
    port, dns_port, proxy_port = free_port(), free_port(), free_port()
    off = {"STABLENET_DNS_ENABLED": "false", "STABLENET_PROXY_ENABLED": "false"}
    parts = {
        "STABLENET_DNS_ENABLED": "true",
        "STABLENET_DNS_LISTEN": f"127.0.0.1:{dns_port}",
        "STABLENET_PROXY_ENABLED": "true",
        "STABLENET_PROXY_LISTEN": f"127.0.0.1:{proxy_port}",
    }
    full_env = {
        **os.environ,
        # A state directory of its own: the controller's lock and state belong to this daemon.
        "STABLENET_CONTROLLER_STATE_DIR": tempfile.mkdtemp(prefix="stablenet-state-"),
        "STABLENET_ADMIN_LISTEN": f"127.0.0.1:{port}",
        **(parts if serving else off),
        **(env or {}),
    }
    proc = await asyncio.create_subprocess_exec(
        *STABLENET,
        "run",
        *args,
        cwd=ROOT,
        env=full_env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=preexec_fn,
    )
    daemon = RunningDaemon(proc, f"http://127.0.0.1:{port}", full_env, [])
    if serving:
        daemon.dns_port, daemon.proxy_port = dns_port, proxy_port
    await wait_for_line(proc, "Docker Engine connected", daemon.log)
    return daemon


async def stop_daemon(daemon: RunningDaemon, sig: int = signal.SIGTERM) -> int:
    if daemon.proc.returncode is None:
        daemon.proc.send_signal(sig)
    assert daemon.proc.stderr is not None
    async with asyncio.timeout(30):
        rest = await daemon.proc.stderr.read()
        code = await daemon.proc.wait()
    daemon.log.append(rest.decode())
    return code


@pytest.fixture
async def daemon() -> AsyncIterator[RunningDaemon]:
    running = await start_daemon()
    yield running
    await stop_daemon(running)


async def test_daemon_serves_registry_over_admin_api_and_cli(
    daemon: RunningDaemon, containers: Containers
) -> None:
    box = await off_loop(
        containers.run, "api", labels={"stablenet.service": "cli-api", "stablenet.port": "80"}
    )
    async with aiohttp.ClientSession() as http:
        async with http.get(daemon.admin + "/healthz") as resp:
            assert resp.status == 200
        async with http.get(daemon.admin + "/readyz") as resp:
            assert resp.status == 200
            assert (await resp.json())["ready"] is True
        await wait_for_line(daemon.proc, "added to service cli-api", daemon.log)
        async with http.get(daemon.admin + "/v1/services/cli-api") as resp:
            assert resp.status == 200
            body = await resp.json()
        async with http.get(daemon.admin + "/v1/services/no-such") as resp:
            assert resp.status == 404
    [endpoint] = body["endpoints"]
    assert endpoint["address"] == ip_of(box)
    assert endpoint["port"] == 80
    assert endpoint["state"] == "ready"

    listing = await off_loop(cli, "services", "--json", env=daemon.env)
    assert listing.returncode == 0, listing.stderr
    services = {s["name"]: s for s in json.loads(listing.stdout)["services"]}
    assert services["cli-api"]["endpoints"][0]["name"] == containers.name("api")
    table = await off_loop(cli, "services", env=daemon.env)
    assert table.returncode == 0
    row = next(line for line in table.stdout.splitlines() if line.startswith("cli-api "))
    assert row.split()[1:4] == [containers.name("api"), f"{ip_of(box)}:80", "ready"]


async def test_sigterm_and_sigint_stop_in_order() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        running = await start_daemon()
        code = await stop_daemon(running, sig)
        text = "".join(running.log)
        assert code == 0, text
        assert text.index("closing listeners") < text.index("cancelling background loops")
        assert "stopped" in text and "Traceback" not in text


async def test_json_logs_parse() -> None:
    running = await start_daemon("--log-format", "json")
    await stop_daemon(running)
    lines = [json.loads(line) for line in "".join(running.log).splitlines() if line.strip()]
    assert any(entry["msg"].startswith("Docker Engine connected") for entry in lines)
    assert {"ts", "level", "logger", "msg"} <= set(lines[0])


async def test_admin_token_guards_api_but_not_probes() -> None:
    running = await start_daemon(env={"STABLENET_ADMIN_TOKEN": "s3cret"})
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(running.admin + "/v1/services") as resp:
                assert resp.status == 401
            async with http.get(
                running.admin + "/v1/services", headers={"Authorization": "Bearer wrong"}
            ) as resp:
                assert resp.status == 401
            async with http.get(
                running.admin + "/v1/services", headers={"Authorization": "Bearer s3cret"}
            ) as resp:
                assert resp.status == 200
            async with http.get(running.admin + "/readyz") as resp:
                assert resp.status == 200
        listing = await off_loop(cli, "services", "--json", env=running.env)
        assert listing.returncode == 0, listing.stderr
    finally:
        await stop_daemon(running)


async def test_busy_admin_port_is_a_clear_startup_error() -> None:
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = blocker.sockets[0].getsockname()[1]
    try:
        result = await off_loop(
            cli,
            "run",
            env={
                "STABLENET_ADMIN_LISTEN": f"127.0.0.1:{port}",
                "STABLENET_DNS_ENABLED": "false",
                "STABLENET_PROXY_ENABLED": "false",
            },
        )
    finally:
        blocker.close()
        await blocker.wait_closed()
    assert result.returncode == 1
    assert f"admin.listen: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


async def test_scale_and_services_show_a_managed_service(containers: Containers) -> None:
    daemon = await start_daemon()
    env = {"STABLENET_ADMIN_LISTEN": daemon.env["STABLENET_ADMIN_LISTEN"]}
    service = containers.name("scaled")
    try:
        await off_loop(
            containers.run,
            "scaled",
            labels={"stablenet.service": service, "stablenet.replicas": "1"},
        )

        async def managed() -> dict[str, object]:
            out = await off_loop(cli, "services", "--json", env=env)
            body = json.loads(out.stdout)
            found = [s["controller"] for s in body["services"] if s["name"] == service]
            return found[0] if found and found[0] else {}

        async def ready(count: int) -> bool:
            state = await managed()
            return state.get("ready") == count and not state.get("in_flight")

        await asked_until(lambda: ready(1), 30)
        done = await off_loop(cli, "scale", service, "2", env=env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"{service}: count set to 2"
        await asked_until(lambda: ready(2), 30)
        table = (await off_loop(cli, "services", env=env)).stdout
        line = next(x for x in table.splitlines() if x.startswith(f"{service}: managed"))
        assert "2 ready of 2 desired" in line and "grow" in line
        unknown = await off_loop(cli, "scale", "no-such-service", "2", env=env)
        assert unknown.returncode == 1
        assert (
            "404" in unknown.stderr
            and "no managed service named 'no-such-service'" in unknown.stderr
        )
    finally:
        await stop_daemon(daemon)
        for box in containers.client.containers.list(
            all=True, filters={"label": f"stablenet.service={service}"}
        ):
            box.remove(force=True)
