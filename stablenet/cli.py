"""Command line: `stablenet run | services | scale | check-config | version`. The only module
that prints and exits; everything it does is a call into the library."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from stablenet import __version__, config, logs, native
from stablenet.units import parse_hostport

EXIT_CONFIG = 2
_COLOURS = {"ready": "32", "starting": "33", "draining": "33", "unhealthy": "31"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stablenet",
        description="Stable names and addresses for containers on a Docker host.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run the daemon in the foreground")
    run.add_argument(
        "--config", metavar="PATH", help="TOML config (default: config/stablenet.toml)"
    )
    run.add_argument("--log-format", choices=("text", "json"), help="overrides log.format")
    run.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), help="overrides log.level"
    )
    # Set by a running stablenet on SIGHUP for the successor it starts: where to take over.
    run.add_argument("--handover-from", metavar="PATH", help=argparse.SUPPRESS)
    services = sub.add_parser("services", help="show what is registered, its state and why")
    services.add_argument("--json", action="store_true", help="print the admin API's JSON")
    services.add_argument("--config", metavar="PATH", help="read admin.listen/token from here")
    services.add_argument("--admin", metavar="URL", help="admin API URL (default from config)")
    scale = sub.add_parser("scale", help="set how many replicas a managed service keeps")
    scale.add_argument("service", metavar="SERVICE")
    scale.add_argument("replicas", metavar="N", type=int)
    scale.add_argument("--config", metavar="PATH", help="read admin.listen/token from here")
    scale.add_argument("--admin", metavar="URL", help="admin API URL (default from config)")
    check = sub.add_parser("check-config", help="validate the config; exit 0, or 2 with why")
    check.add_argument("--config", metavar="PATH")
    sub.add_parser("version", help="print the version and which build of the proxy runs")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "version":
            importlib.import_module("stablenet.proxy.client")  # to say which build of it loads
            print(f"stablenet {__version__}")
            print(f"request path: {native.describe()}")
            return 0
        if args.command == "check-config":
            config.load(args.config)
            print(f"config OK: {args.config or os.environ.get('STABLENET_CONFIG') or 'defaults'}")
            return 0
        if args.command == "services":
            return _services(args)
        if args.command == "scale":
            return _scale(args)
        return _run(args)
    except config.ConfigError as exc:
        print(f"stablenet: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def _run(args: argparse.Namespace) -> int:
    from stablenet import daemon
    from stablenet.errors import StartupError

    cfg = config.load(args.config)
    logs.setup(args.log_level or cfg.log.level, args.log_format or cfg.log.format)
    try:
        daemon.run(cfg, args.handover_from)
    except StartupError as exc:
        print(f"stablenet: cannot start: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):  # a forced stop (second Ctrl-C)
        return 130
    return 0


def _admin_url(args: argparse.Namespace) -> tuple[str, str]:
    cfg = config.load(args.config)
    if args.admin:
        return args.admin.rstrip("/"), cfg.admin.token
    host, port = parse_hostport(cfg.admin.listen)
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}", cfg.admin.token


def _admin_call(
    args: argparse.Namespace, path: str, payload: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """GET (or POST ``payload`` as JSON to) the admin API; None after printing why it failed."""
    base, token = _admin_url(args)
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(base + path, data=data)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            body: dict[str, Any] = json.load(response)
            return body
    except urllib.error.HTTPError as exc:
        detail = ""
        with contextlib.suppress(ValueError, OSError):
            detail = ": " + str(json.load(exc).get("error", ""))
        print(
            f"stablenet: admin API at {base} answered {exc.code} {exc.reason}{detail}",
            file=sys.stderr,
        )
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        print(
            f"stablenet: cannot reach the admin API at {base} ({reason}); is `stablenet run` "
            "running with the same admin.listen?",
            file=sys.stderr,
        )
    return None


def _scale(args: argparse.Namespace) -> int:
    service = str(args.service).lower()
    body = _admin_call(args, f"/v1/services/{service}/scale", {"replicas": args.replicas})
    if body is None:
        return 1
    print(f"{service}: count set to {body['replicas']}")
    return 0


def _services(args: argparse.Namespace) -> int:
    body = _admin_call(args, "/v1/services")
    if body is None:
        return 1
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    print(render_table(body, colour=sys.stdout.isatty() and "NO_COLOR" not in os.environ))
    return 0


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


def _managed_line(managed: dict[str, Any]) -> str:
    """One line on what the controller keeps and last did for a service."""
    desired = managed.get("desired")
    parts = [
        f"managed, {managed.get('ready', 0)} ready"
        + (f" of {desired} desired" if desired is not None else " (heal only)"),
        f"heal={managed.get('heal')}",
    ]
    scaling = managed.get("autoscale")
    if scaling:
        parts.append(f"autoscaled {scaling['min']}-{scaling['max']}: {scaling['reason']}")
    if managed.get("held"):
        parts.append("stopped by the operator: " + ", ".join(managed["held"]))
    last = managed.get("last_action")
    if last:
        parts.append(
            f"last: {last['action']} {last['target']} ({last['reason']}): {last['result']}"
        )
    if managed.get("next_retry_at"):
        parts.append(f"next retry in {_age(managed['next_retry_at'] - time.time())}")
    for key in ("degraded", "refused", "problem"):
        if managed.get(key):
            parts.append(f"{key.upper()}: {managed[key]}")
    return "; ".join(parts)


def _vip_lines(body: dict[str, Any]) -> list[str]:
    """The services' virtual addresses and data paths (when VIPs are on), aligned."""
    rows = [
        (s["name"], s["vip"]["address"], s["vip"]["path"], " ".join(s["vip"]["ports"]) or "-")
        for s in body.get("services", [])
        if s.get("vip")
    ]
    if not rows:
        return []
    rows.insert(0, ("SERVICE", "VIRTUAL ADDRESS", "PATH", "PORTS"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    out = [""]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        out.append("  ".join([*cells, row[3]]))
    return out


def render_table(body: dict[str, Any], colour: bool = False) -> str:
    """The services listing as aligned text: one row per endpoint."""
    rows = [("SERVICE", "ENDPOINT", "ADDRESS", "STATE", "AGE", "REASON")]
    states: list[str] = [""]
    for service in body.get("services", []):
        for ep in service["endpoints"]:
            port = ep["port"]
            address = f"{ep['address']}:{port}" if port else ep["address"]
            rows.append(
                (
                    service["name"],
                    f"{ep['name']}@{ep['host']}" if ep.get("host") else ep["name"],
                    address,
                    ep["state"],
                    _age(ep["age_seconds"]),
                    ep["reason"],
                )
            )
            states.append(ep["state"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for row, state in zip(rows, states, strict=True):
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        if colour and state in _COLOURS:
            cells[3] = f"\x1b[{_COLOURS[state]}m{cells[3]}\x1b[0m"
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    if len(rows) == 1 and not any(s.get("controller") for s in body.get("services", [])):
        lines.append("(no services registered)")
    for service in body.get("services", []):
        managed = service.get("controller")
        if managed:
            lines.append(f"{service['name']}: {_managed_line(managed)}")
    lines += _vip_lines(body)
    if not body.get("synced", True):
        lines.append("warning: not synced with the Docker Engine; showing the last known state")
    for problem in body.get("problems", []):
        lines.append(f"skipped: {problem['message']}")
    return "\n".join(lines)
