"""Shared fixtures: the Docker Engine (required, never mocked), the test image, owned
containers, and an in-process registry fed by a real DockerSource."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator

import docker
import docker.errors
import pytest

from stablenet.config import DockerConfig, HealthConfig
from stablenet.docker.source import DockerSource
from stablenet.docker.translate import Settings
from stablenet.registry import Registry
from tests.helpers import Containers, ensure_image, until


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    """The engine at DOCKER_HOST. Missing engine = loud failure, never a skip."""
    try:
        client = docker.from_env(version="auto", timeout=60)
        client.ping()
    except docker.errors.DockerException as exc:
        pytest.fail(
            f"no Docker Engine answers at DOCKER_HOST={os.environ.get('DOCKER_HOST', '(unset)')}"
            f" ({exc}); run the suite with `bash scripts/test.sh`, which starts one",
            pytrace=False,
        )
    yield client
    client.close()


@pytest.fixture(scope="session")
def test_image(docker_client: docker.DockerClient) -> str:
    return ensure_image(docker_client)


@pytest.fixture
def containers(docker_client: docker.DockerClient, test_image: str) -> Iterator[Containers]:
    owned = Containers(docker_client, test_image)
    yield owned
    owned.cleanup()


async def start_source(
    registry: Registry, settings: Settings, resync_interval: float = 3600.0, **kwargs: object
) -> tuple[DockerSource, asyncio.Task[None]]:
    source = DockerSource(registry, settings, resync_interval=resync_interval, **kwargs)  # type: ignore[arg-type]
    task = asyncio.get_running_loop().create_task(source.run(), name="test-docker-source")
    await until(registry, lambda snap: snap.synced, 30)
    return source, task


@pytest.fixture
async def registry() -> AsyncIterator[Registry]:
    """A registry kept in sync with the engine by a real DockerSource (resync only on events)."""
    reg = Registry()
    settings = Settings.from_config(DockerConfig(), HealthConfig())
    _, task = await start_source(reg, settings)
    yield reg
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
