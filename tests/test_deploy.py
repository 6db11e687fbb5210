"""Deployment: the Compose example's labels run through the registry, the systemd unit, and the
Dockerfile built on a local stand-in for python:3.11-slim and run against the engine.

No registry is reachable, so the base image is a Debian bookworm root made by debootstrap (with
Debian's python3 and python3-venv) and `docker import`ed as python:3.11-slim. It is built once
per engine: an image of that name with the label below is reused; an image of that name without
the label is taken to be the real one and used as it is."""

from __future__ import annotations

import configparser
import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
import yaml

from stablenet import native
from stablenet.registry import Registry
from tests.helpers import Containers, free_port, ip_of, off_loop, until

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "config" / "compose.example.yaml"
UNIT = ROOT / "config" / "stablenet.service"

BASE_IMAGE = "python:3.11-slim"
BASE_LABEL = "org.stablenet.test.base"
# Bump when the recipe below changes, so engines holding an older stand-in rebuild it.
BASE_RECIPE = "debootstrap-minbase-bookworm-python3-venv-1"
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
IMAGE = "stablenet-test/stablenet:latest"
BUILD_STAGE = "stablenet-test/stablenet:build"
LOCK = Path(tempfile.gettempdir()) / "stablenet-python-base.lock"
# Run inside the image: what runs the request path, which compiled modules it holds, and which
# build tools reached the final stage (none should).
PROBE = """
import importlib.util, json, shutil
import stablenet.proxy.client
from stablenet import native
print(json.dumps({
    "request_path": native.describe(),
    "compiled": sorted(
        p.relative_to(native.BUILD / "stablenet").as_posix().split(".")[0]
        for p in native.BUILD.rglob("*.so")
    ),
    "tools": [t for t in ("gcc", "cc", "x86_64-linux-gnu-gcc") if shutil.which(t)],
    "modules": [m for m in ("mypy", "mypyc", "setuptools", "pip") if importlib.util.find_spec(m)],
}))
"""


# --- Compose ------------------------------------------------------------------------------------


def compose_labels(service: dict[str, Any]) -> dict[str, str]:
    """A Compose service's labels, written as a mapping or as a list of KEY=VALUE."""
    labels = service.get("labels") or {}
    if isinstance(labels, list):
        return dict(str(item).split("=", 1) for item in labels)
    return {str(key): str(value) for key, value in labels.items()}


def test_compose_example_is_complete() -> None:
    spec = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    daemon, web = spec["services"]["stablenet"], spec["services"]["web"]
    assert daemon["network_mode"] == "host"
    assert "/var/run/docker.sock:/var/run/docker.sock" in daemon["volumes"]
    assert compose_labels(daemon)["stablenet.enable"] == "false"
    assert web["deploy"]["replicas"] == 2
    assert {"stablenet.port", "stablenet.health.path"} <= compose_labels(web).keys()


async def test_compose_example_labels_form_one_service(
    registry: Registry, containers: Containers
) -> None:
    """Containers carrying the labels Compose sets for the example's services: both web
    replicas become endpoints of one service named after the Compose service; the daemon's own
    container is not registered."""
    spec = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    project = spec["name"]

    def compose_container(service: str, number: int) -> Any:
        labels = {
            "com.docker.compose.project": project,
            "com.docker.compose.service": service,
            "com.docker.compose.container-number": str(number),
            "com.docker.compose.oneoff": "False",
            "com.docker.compose.project.config_files": str(COMPOSE),
            "com.docker.compose.project.working_dir": str(COMPOSE.parent),
            **compose_labels(spec["services"][service]),
        }
        # Compose would name it <project>-<service>-<n>; the prefix keeps names unique here.
        return containers.run(f"{project}-{service}-{number}", labels=labels)

    daemon = await off_loop(compose_container, "stablenet", 1)
    replicas = spec["services"]["web"]["deploy"]["replicas"]
    web = [await off_loop(compose_container, "web", n) for n in range(1, replicas + 1)]
    ids = {str(c.id) for c in web}

    snap = await until(registry, lambda s: ids <= s.endpoints.keys(), 30)
    # Only this test's containers: the engine may hold other "web" replicas meanwhile.
    ours = [e for e in snap.services["web"] if e.name.startswith(containers.prefix + "-")]
    assert {e.id for e in ours} == ids
    for ep in ours:
        assert ep.service == "web"
        assert ep.port == 80
        assert ep.check is not None and ep.check.path == "/"
        assert ep.http_hosts == ("www.example.test",)
        assert ep.address == await off_loop(ip_of, next(c for c in web if c.id == ep.id))
    assert str(daemon.id) not in snap.endpoints
    assert str(daemon.id) not in snap.problems


# --- systemd ------------------------------------------------------------------------------------


def test_systemd_unit() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(UNIT, encoding="utf-8")
    service = unit["Service"]
    argv = service["ExecStart"].split()
    assert Path(argv[0]).name == "stablenet" and argv[1] == "run", argv
    assert service["Restart"] == "on-failure"
    assert "docker.service" in unit["Unit"]["After"].split()
    assert {"CAP_NET_BIND_SERVICE", "CAP_NET_ADMIN"} <= set(
        service["CapabilityBoundingSet"].split()
    )
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    # verify checks that ExecStart exists: point it at this checkout's CLI for the check.
    cli = Path(sys.executable).with_name("stablenet")
    assert cli.exists(), f"{cli} missing: run scripts/install.sh"
    text = UNIT.read_text(encoding="utf-8").replace(argv[0], str(cli))
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / UNIT.name
        copy.write_text(text, encoding="utf-8")
        result = subprocess.run(
            [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60
        )
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not output, output


# --- the image ----------------------------------------------------------------------------------


def apt_mirror() -> str:
    """The Debian mirror apt on this machine uses for bookworm (one-line or deb822 sources)."""
    files = [Path("/etc/apt/sources.list")]
    with contextlib.suppress(OSError):
        files += sorted(Path("/etc/apt/sources.list.d").iterdir())
    for path in files:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, list[str]] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or line.startswith((" ", "\t")) or ":" not in line:
                        continue
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.split()
                if "deb" in fields.get("types", []) and SUITE in fields.get("suites", []):
                    return fields["uris"][0].rstrip("/")
        elif path.suffix == ".list" or path.name == "sources.list":
            for line in text.splitlines():
                words = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE:
                    return words[1].rstrip("/")
    return DEFAULT_MIRROR


def _unmount_under(root: Path) -> bool:
    """Unmount whatever a failed debootstrap left mounted inside ``root``; True when clean."""

    def mounted() -> list[str]:
        prefix = str(root) + "/"
        with open("/proc/self/mounts", encoding="utf-8") as mounts:
            points = [line.split()[1] for line in mounts]
        return sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True)

    for point in mounted():
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)
    return not mounted()


@contextlib.contextmanager
def _base_lock() -> Iterator[None]:
    with open(LOCK, "w", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_python_base(client: docker.DockerClient) -> str:
    """python:3.11-slim in this engine: the real one if present, else a debootstrapped Debian
    bookworm with python3 and python3-venv, built once and kept. Returns what it is."""
    with _base_lock():
        with contextlib.suppress(docker.errors.ImageNotFound):
            labels = client.images.get(BASE_IMAGE).labels or {}
            if BASE_LABEL not in labels:
                return "official image"
            if labels[BASE_LABEL] == BASE_RECIPE:
                return "stand-in (cached)"
        debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
        if not Path(debootstrap).exists():
            pytest.fail("debootstrap is missing: run scripts/install.sh", pytrace=False)
        work = Path(tempfile.mkdtemp(prefix="stablenet-base-", dir="/var/tmp"))
        root = work / "root"
        try:
            started = time.monotonic()
            result = subprocess.run(
                [
                    debootstrap,
                    "--variant=minbase",
                    "--include=python3,python3-venv",
                    SUITE,
                    str(root),
                    apt_mirror(),
                ],
                capture_output=True,
                text=True,
                timeout=600,
            )
            if result.returncode != 0:
                pytest.fail(f"debootstrap failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
            # What official images leave out too: downloaded packages and package lists.
            for leftovers in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for item in (root / leftovers).glob("*"):
                    if item.is_file():
                        item.unlink()
            tarball = work / "root.tar"
            subprocess.run(
                ["tar", "-C", str(root), "--numeric-owner", "-cf", str(tarball), "."], check=True
            )
            client.api.import_image_from_file(
                str(tarball),
                repository=BASE_IMAGE.split(":")[0],
                tag=BASE_IMAGE.split(":")[1],
                changes=[
                    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "ENV LANG=C.UTF-8",
                    'CMD ["python3"]',
                    f"LABEL {BASE_LABEL}={BASE_RECIPE}",
                ],
            )
            return f"stand-in (built in {time.monotonic() - started:.0f} s)"
        finally:
            if _unmount_under(root):
                shutil.rmtree(work, ignore_errors=True)


def build_context(dest: Path) -> dict[str, str]:
    """A copy of what the image needs, plus a wheelhouse resolved here with this machine's pip
    settings; returns the build arguments that make pip inside the build use only it. pip here
    may need an index or a CA bundle (a TLS-inspecting proxy) that the image does not have; the
    wheels it resolves need neither."""
    for name in ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(
        ROOT / "stablenet", dest / "stablenet", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("config/stablenet.toml", "scripts/native.py"):
        (dest / name).parent.mkdir(exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    # The build stage's compiler: mypy at the version the test tools ask for.
    [mypy] = [r for r in meta["project"]["optional-dependencies"]["test"] if r.startswith("mypy>")]
    wanted = [*meta["build-system"]["requires"], "wheel", mypy, *meta["project"]["dependencies"]]
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(dest / "wheels")]
        + ["--only-binary=:all:", "--python-version", "3.11", *wanted],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"pip download failed:\n{result.stderr[-3000:]}"
    return {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "/src/wheels"}


def build_image(client: docker.DockerClient, context: Path, args: dict[str, str]) -> Any:
    """docker build with the classic builder (the Engine API's /build; no BuildKit needed).
    The build stage is tagged too, so a rebuild after a change replaces both images instead of
    leaving untagged ones behind."""
    image: Any = None
    for target, tag in (("build", BUILD_STAGE), (None, IMAGE)):
        previous = None
        with contextlib.suppress(docker.errors.ImageNotFound):
            previous = client.images.get(tag).id
        try:
            image, _ = client.images.build(
                path=str(context),
                tag=tag,
                target=target,
                buildargs=args,
                rm=True,
                forcerm=True,
                pull=False,
            )
        except docker.errors.BuildError as exc:
            log = "".join(str(c.get("stream", c.get("error", ""))) for c in exc.build_log)
            pytest.fail(f"docker build failed: {exc.msg}\n{log[-6000:]}", pytrace=False)
        if previous is not None and previous != image.id:
            with contextlib.suppress(docker.errors.APIError):
                client.images.remove(previous)
    return image


def engine_socket() -> str:
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not host.startswith("unix://"):
        pytest.skip(f"the image test mounts the engine's socket; DOCKER_HOST={host} is not one")
    return host.removeprefix("unix://")


def get_json(url: str) -> tuple[int, Any]:
    """(status, parsed body); (0, None) while nothing listens."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (urllib.error.URLError, OSError):
        return 0, None


def wait_for(what: str, probe: Any, timeout: float, logs: Any) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.25)
    pytest.fail(f"{what} within {timeout:.0f} s; daemon log:\n{logs()}", pytrace=False)


@pytest.mark.engine
@pytest.mark.timeout(900)
def test_image_builds_and_serves(containers: Containers, tmp_path: Path) -> None:
    socket_path = engine_socket()
    client = docker.from_env(version="auto", timeout=900)
    try:
        started = time.monotonic()
        base = ensure_python_base(client)
        base_seconds = time.monotonic() - started
        started = time.monotonic()
        image = build_image(client, tmp_path, build_context(tmp_path))
        build_seconds = time.monotonic() - started
        print(
            f"base {BASE_IMAGE}: {base}, {base_seconds:.0f} s; image build {build_seconds:.0f} s,"
            f" {image.attrs['Size'] / 1e6:.0f} MB"
        )
        assert image.labels.get("stablenet.enable") == "false"
        assert image.attrs["Config"]["Entrypoint"] == ["stablenet"]

        # The final stage runs the compiled request path and carries no build tools.
        version = client.containers.run(
            image.id, ["version"], name=containers.name("version"), remove=True
        ).decode()
        assert "request path: compiled (mypyc)" in version, version
        probe = json.loads(
            client.containers.run(
                image.id,
                ["-c", PROBE],
                entrypoint=["python3"],
                name=containers.name("probe"),
                remove=True,
            )
        )
        expected = {name.removesuffix(".py") for name in native.COMPILED}
        assert set(probe["compiled"]) == expected | {native.LIBRARY.rsplit(".", 1)[1]}, probe
        assert probe["request_path"] == "compiled (mypyc)", probe
        assert probe["tools"] == [] and probe["modules"] == [], probe

        port, proxy_port = free_port(), free_port()
        daemon = client.containers.run(
            image.id,
            name=containers.name("daemon"),
            detach=True,
            network_mode="host",
            volumes={socket_path: {"bind": "/var/run/docker.sock", "mode": "rw"}},
            environment={
                "STABLENET_ADMIN_LISTEN": f"127.0.0.1:{port}",
                "STABLENET_DNS_ENABLED": "false",
                "STABLENET_PROXY_LISTEN": f"127.0.0.1:{proxy_port}",
            },
        )
        containers.created.append(str(daemon.id))

        def logs() -> str:
            return str(daemon.logs(tail=40).decode(errors="replace"))

        admin = f"http://127.0.0.1:{port}"
        wait_for(
            "/readyz did not answer 200", lambda: get_json(admin + "/readyz")[0] == 200, 60, logs
        )
        assert "request path: compiled (mypyc)" in daemon.logs().decode(errors="replace")

        service = f"{containers.prefix}-img"
        web = containers.run(
            "img-web", labels={"stablenet.service": service, "stablenet.port": "80"}
        )

        def listed() -> dict[str, Any] | None:
            status, body = get_json(f"{admin}/v1/services/{service}")
            return body if status == 200 else None

        body = wait_for(f"/v1/services did not list {service}", listed, 30, logs)
        [endpoint] = body["endpoints"]
        assert endpoint["id"] == web.id
        assert endpoint["address"] == ip_of(web) and endpoint["port"] == 80

        # A request through the image's proxy: the compiled request path serves.
        def proxied() -> bytes | None:
            request = urllib.request.Request(
                f"http://127.0.0.1:{proxy_port}/",
                headers={"Host": f"{service}.stablenet.internal"},
            )
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    return bytes(response.read()) if response.status == 200 else None
            except (urllib.error.URLError, OSError):
                return None

        assert wait_for("the proxy did not answer for the service", proxied, 30, logs) == b"ok\n"
        _, everything = get_json(admin + "/v1/services")
        assert daemon.id not in {e["id"] for s in everything["services"] for e in s["endpoints"]}

        def healthy() -> bool:
            daemon.reload()
            return bool(daemon.attrs["State"].get("Health", {}).get("Status") == "healthy")

        wait_for("the image's HEALTHCHECK did not pass", healthy, 90, logs)

        daemon.stop(timeout=30)
        assert daemon.wait(timeout=60)["StatusCode"] == 0, logs()
        assert "stopped" in logs()
    finally:
        client.close()
