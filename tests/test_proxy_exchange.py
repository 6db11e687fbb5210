"""The exchange's phases and the retry rules, with no sockets: the transition table move by move,
retry.decide over every combination of its inputs, and the per-service retry budget."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from typing import Any

import pytest

from stablenet.config import ProxyConfig
from stablenet.proxy import Proxy, exchange
from stablenet.proxy.client import ClientConnection
from stablenet.proxy.exchange import TRANSITIONS, Exchange, IllegalMove, Phase
from stablenet.proxy.retry import Attempt, RetryBudget, Verdict, decide, reuse_ok
from stablenet.registry import Registry


@pytest.fixture(scope="module")
def conn() -> Iterator[ClientConnection]:
    """A client connection the exchanges belong to; never connected: no I/O here."""
    loop = asyncio.new_event_loop()

    async def make() -> ClientConnection:
        return ClientConnection(Proxy(Registry(), ProxyConfig()).dispatcher)

    yield loop.run_until_complete(make())
    loop.close()


def fresh(conn: ClientConnection, phase: Phase) -> Exchange:
    ex = Exchange(conn)
    ex.phase = phase
    return ex


@pytest.mark.parametrize(("src", "dst"), list(itertools.product(Phase, Phase)))
def test_every_move_is_allowed_exactly_when_the_table_says(
    conn: ClientConnection, src: Phase, dst: Phase
) -> None:
    ex = fresh(conn, src)
    if dst in TRANSITIONS[src]:
        ex.move(dst)
        assert ex.phase == dst
    else:
        with pytest.raises(IllegalMove):
            ex.move(dst)
        assert ex.phase == src


def test_the_int_phases_are_the_enums() -> None:
    for phase in Phase:
        assert getattr(exchange, phase.name) == phase


def test_the_table_has_every_phase_reach_done_and_done_is_final() -> None:
    assert set(TRANSITIONS) == set(Phase)
    assert TRANSITIONS[Phase.DONE] == frozenset()
    assert all(Phase.DONE in TRANSITIONS[p] for p in Phase if p is not Phase.DONE)
    # Once the client saw bytes (streaming) or the protocol switched, there is no way back.
    assert TRANSITIONS[Phase.STREAMING] == {Phase.DONE}
    assert TRANSITIONS[Phase.TUNNEL] == {Phase.DONE}
    assert Phase.ROUTING not in TRANSITIONS[Phase.UPGRADE_PENDING]


def attempt(**kw: Any) -> Attempt:
    base: dict[str, Any] = {
        "phase": Phase.SENT,
        "idempotent": True,
        "replayable": True,
        "reused": False,
        "got_bytes": False,
        "client_saw": False,
        "sends": 1,
        "race_retried": False,
    }
    base.update(kw)
    return Attempt(**base)


FIELDS: dict[str, list[Any]] = {
    "phase": list(Phase),
    "idempotent": [True, False],
    "replayable": [True, False],
    "reused": [True, False],
    "got_bytes": [True, False],
    "client_saw": [True, False],
    "sends": [0, 1, 2, 3],
    "race_retried": [True, False],
}


def test_decide_over_every_combination() -> None:
    """The rules restated independently, checked on all 2,560 combinations x budget."""
    for values in itertools.product(*FIELDS.values()):
        a = Attempt(**dict(zip(FIELDS, values, strict=True)))
        for budget_ok in (True, False):
            got = decide(a, retries=2, budget_ok=budget_ok)
            if a.client_saw:
                want = Verdict.FAIL
            elif a.phase == Phase.CONNECTING:
                want = Verdict.RETRY
            elif a.phase not in (Phase.SENT, Phase.HEAD_PENDING):
                want = Verdict.FAIL
            elif not (a.idempotent and a.replayable) or a.sends > 2:
                want = Verdict.FAIL
            elif a.reused and not a.got_bytes and not a.race_retried:
                want = Verdict.RETRY_FRESH
            elif not budget_ok:
                want = Verdict.FAIL
            else:
                want = Verdict.RETRY
            assert got is want, (a, budget_ok)


def test_a_written_post_is_never_retried_whatever_else_holds() -> None:
    for phase in (Phase.SENT, Phase.HEAD_PENDING, Phase.UPGRADE_PENDING, Phase.STREAMING):
        for reused, got_bytes in itertools.product((True, False), repeat=2):
            a = attempt(phase=phase, idempotent=False, reused=reused, got_bytes=got_bytes)
            assert decide(a, retries=10, budget_ok=True) is Verdict.FAIL


def test_a_refused_connection_is_retried_even_for_a_post() -> None:
    a = attempt(phase=Phase.CONNECTING, idempotent=False, sends=0)
    assert decide(a, retries=0, budget_ok=False) is Verdict.RETRY


def test_non_idempotent_requests_only_reuse_recently_used_connections() -> None:
    assert reuse_ok(True, 100.0, 1.0)
    assert reuse_ok(False, 0.5, 1.0)
    assert not reuse_ok(False, 1.0, 1.0)


def test_retry_budget_is_a_share_of_requests_plus_a_floor_over_a_window() -> None:
    budget = RetryBudget(percent=20.0, floor=0.1, window=10.0)  # floor: 1 retry per window
    now = 1000.0
    budget.tick(now - 0.5, 0)
    budget.tick(now, 100)  # 100 requests since the first tick
    spent = 0
    while budget.allows(now):
        budget.spend(now)
        spent += 1
    assert spent == 21  # 20% of 100, plus the floor
    assert not budget.allows(now + 9.0)  # still inside the window
    assert budget.allows(now + 10.0)  # the window moved past every spent retry
    assert not RetryBudget(percent=0.0, floor=0.0).allows(now)


def test_retry_budget_forgets_requests_older_than_its_window() -> None:
    budget = RetryBudget(percent=50.0, floor=0.0, window=5.0)
    budget.tick(0.0, 0)
    budget.tick(0.5, 10)
    assert budget.allows(4.0)
    assert not budget.allows(5.0)  # the requests aged out
    budget.tick(100.0, 12)
    assert budget.allows(100.0)
    budget.spend(100.0)
    assert not budget.allows(100.5)


def test_retry_budget_counts_nothing_before_its_first_tick() -> None:
    budget = RetryBudget(percent=100.0, floor=0.0, window=5.0)
    budget.tick(0.0, 5000)  # the service's requests before the budget existed
    assert not budget.allows(0.0)
