"""The promise, under load: no failed idempotent request, no request run twice where it may not
be, and no stale DNS answer while a service's replicas restart in every way Docker allows (a
small run of benchmarks/failover); and how the benchmark counts executions and ejections."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.failover import (
    KINDS,
    Outcome,
    ejections,
    executions,
    parse_ledger,
    query_of_death,
    run,
)
from tests.helpers import Containers


async def short_run(**settings: Any) -> dict[str, Any]:
    """A short run of the benchmark against stablenet: 6 clients, 10% of them POST."""
    defaults = {"concurrency": 6, "post_share": 0.1, "hold_timeout": 10.0, "max_requests": 200_000}
    return await run("stablenet", **(defaults | settings))


def outcome(rid: str, method: str = "GET", kind: str = "ok", status: int = 200) -> Outcome:
    return Outcome(rid, 0.0, 1.0, method, kind, status)


def test_ledger_lines_count_per_id_and_torn_lines_apart() -> None:
    ledger = parse_ledger("1 GET aaa\n2 POST bbb\n1 GET ccc\n3 PO\nST ddd\n")
    assert ledger.hosts == {"1": ["aaa", "ccc"], "2": ["bbb"]}
    assert ledger.count("1") == 2
    assert ledger.count("9") == 0
    assert ledger.garbled == 2


def test_executions_tell_duplicates_and_failed_posts_that_ran() -> None:
    ledger = parse_ledger(
        "1 GET a\n1 GET b\n"  # a retried GET
        "2 POST a\n2 POST b\n"  # a POST run twice
        "3 POST a\n"  # answered 502, ran all the same
        "5 GET a\n"
    )
    outcomes = [
        outcome("1"),
        outcome("2", "POST"),
        outcome("3", "POST", "5xx", 502),
        outcome("4", "POST", "conn", 0),  # never reached a backend
        outcome("5"),
        outcome("6"),  # answered, yet not in the ledger
    ]
    result = executions(outcomes, ledger)
    assert result["duplicated_post"] == 1
    assert result["duplicated_post_examples"] == ["2 (ok): a, b"]
    assert result["duplicated_get"] == 1
    assert result["failed_post_executed"] == 1
    assert result["failed_post_not_executed"] == 1
    assert result["ok_unrecorded"] == 1
    assert result["recorded"] == 6


def test_query_of_death_counts_each_request_reaching_backends() -> None:
    ledger = parse_ledger("qod-0 GET a\nqod-0 GET b\nqod-0 GET a\nqod-1 GET c\n")
    qods = [outcome("qod-0", kind="5xx", status=503), outcome("qod-1", kind="conn", status=0)]
    result = query_of_death(qods, ledger)
    assert result["reached"] == [3, 1]
    assert result["reached_max"] == 3
    assert result["answers"] == {"503": 1, "conn": 1}


def test_ejections_counted_from_state_events_with_the_most_out_at_once() -> None:
    def state(endpoint: str, change: str) -> dict[str, Any]:
        return {"kind": "state", "endpoint": endpoint, "message": change}

    events: list[dict[str, Any]] = [
        {"kind": "added", "endpoint": "a", "message": "added at 10.0.0.2:80, starting"},
        state("a", "ready -> unhealthy (ejected after 5 failed requests: EOF; probing again)"),
        state("b", "ready -> unhealthy (ejected after 5 failed requests: EOF; probing again)"),
        state("a", "unhealthy -> ready (HTTP 200 (back after ejection))"),
        state("c", "ready -> unhealthy (HTTP 503)"),  # failed its checks: not an ejection
        state("a", "ready -> unhealthy (ejected after 5 failed requests: EOF; probing again)"),
        {"kind": "removed", "endpoint": "b", "message": "removed from 10.0.0.3"},
    ]
    assert ejections(events) == {"count": 3, "endpoints": 2, "most_at_once": 2}


@pytest.mark.parametrize("replicas", [2, 1])
async def test_no_failed_request_while_replicas_restart(
    replicas: int, containers: Containers
) -> None:
    result = await short_run(
        replica_count=replicas, kinds=list(KINDS), restarts=10, dns_rounds=3000
    )
    assert result["restarts"] == {kind: 10 for kind in KINDS}
    assert result["get_requests"] > 1000
    assert result["failed_get"] == {}
    # POST is not idempotent: the proxy may not retry it, so such failures are only counted,
    # and only as an error answer, never as a wrong backend, and it never runs twice.
    assert "wrong-backend" not in result["failed_post"]
    runs = result["executions"]
    assert runs["duplicated_post"] == 0, runs["duplicated_post_examples"]
    assert runs["ok_unrecorded"] == 0 and runs["garbled_lines"] == 0  # the ledger is whole
    assert result["dns"]["lookups"] > 100
    assert result["dns"]["stale"] == 0, result["dns"]["stale_examples"]
    if replicas == 1:
        assert result["held_requests"] > 0  # requests waited for the replica instead of failing


async def test_no_post_runs_twice_on_keep_alive_backends_that_restart(
    containers: Containers,
) -> None:
    """Backends that keep connections alive and work 20 ms per request: a POST whose replica
    dies after executing it must not be sent again (the pooled connection is the one it ran
    on, or looked just like it)."""
    result = await short_run(
        replica_count=2,
        kinds=list(KINDS),
        restarts=5,
        backend="keepalive",
        work_ms=20,
        dns_rounds=0,
    )
    runs = result["executions"]
    assert runs["duplicated_post"] == 0, runs["duplicated_post_examples"]
    assert result["failed_get"] == {}
    assert runs["ok_unrecorded"] == 0 and runs["garbled_lines"] == 0


@pytest.mark.parametrize("backend", ["httpd", "keepalive"])
async def test_query_of_death_is_counted_at_the_backends(
    backend: str, containers: Containers
) -> None:
    result = await short_run(
        replica_count=3,
        kinds=[],
        restarts=0,
        concurrency=2,
        hold_timeout=2.0,
        dns_rounds=0,
        query_of_death_count=1,
        backend=backend,
    )
    qod = result["query_of_death"]
    assert qod["sent"] == 1
    assert qod["reached_max"] >= 1  # recorded by the backend before its connection died
    assert qod["reached_max"] <= 3  # the first attempt and proxy.retries (2) more, at most
    assert "200" not in qod["answers"]
    assert result["ejections"]["most_at_once"] < 3  # never the whole service
    assert result["get_requests"] > 100 and result["failed_get"] == {}
    assert result["executions"]["ok_unrecorded"] == 0
    assert result["executions"]["garbled_lines"] == 0
