"""The promise, under load: no failed idempotent request and no stale DNS answer while a
service's replicas restart in every way Docker allows (a small run of benchmarks/failover)."""

from __future__ import annotations

import pytest

from benchmarks.failover import KINDS, run
from tests.helpers import Containers


@pytest.mark.parametrize("replicas", [2, 1])
async def test_no_failed_request_while_replicas_restart(
    replicas: int, containers: Containers
) -> None:
    result = await run(
        "stablenet",
        replica_count=replicas,
        kinds=list(KINDS),
        restarts=10,
        concurrency=6,
        post_share=0.1,
        hold_timeout=10.0,
        max_requests=200_000,
        dns_rounds=3000,
    )
    assert result["restarts"] == {kind: 10 for kind in KINDS}
    assert result["get_requests"] > 1000
    assert result["failed_get"] == {}
    # POST is not idempotent: the proxy may not retry it, so such failures are only counted,
    # and only as an error answer, never as a wrong backend.
    assert "wrong-backend" not in result["failed_post"]
    assert result["dns"]["lookups"] > 100
    assert result["dns"]["stale"] == 0, result["dns"]["stale_examples"]
    if replicas == 1:
        assert result["held_requests"] > 0  # requests waited for the replica instead of failing
