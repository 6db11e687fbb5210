"""The health state machine with injected time: rise/fall, ejection backoff, and the limits on
passive ejection (never the last ready endpoint, at most max_ejection_percent). No sleeps."""

from __future__ import annotations

import itertools

import pytest

from stablenet.health.state import (
    FIRST_SECOND_INTERVAL,
    STARTING_INTERVAL,
    EndpointHealth,
    Health,
    Peers,
    Refusal,
    Thresholds,
    ejection_refusal,
)

ALONE_OK = Peers(endpoints=4, ejected=0, other_ready=3)  # room to eject this one


def machine(**limits: float) -> EndpointHealth:
    return EndpointHealth(Thresholds(**limits))  # type: ignore[arg-type]


def health(h: EndpointHealth) -> Health:
    return h.health


def test_first_pass_routes_failures_before_keep_it_starting() -> None:
    h = machine(rise=3, fall=2, start_grace=5.0)
    assert not h.check_result(False, "connection refused", now=0.0)
    assert not h.check_result(False, "connection refused", now=0.25)
    assert not h.check_result(False, "connection refused", now=0.5)
    assert health(h) is Health.UNKNOWN and h.reason == "connection refused"
    assert h.check_result(True, "HTTP 200", now=0.75)  # one pass is enough the first time
    assert health(h) is Health.UP


def test_never_passing_endpoint_is_down_after_grace() -> None:
    h = machine(fall=2, start_grace=5.0)
    for t in (0.0, 1.0, 2.0, 4.9):
        h.check_result(False, "HTTP 404 (expected 200-399)", now=t)
    assert health(h) is Health.UNKNOWN
    h.check_result(False, "HTTP 404 (expected 200-399)", now=5.0)
    assert health(h) is Health.DOWN


def test_fall_then_rise() -> None:
    h = machine(rise=2, fall=3)
    h.check_result(True, "HTTP 200", now=0)
    assert not h.check_result(False, "HTTP 503 (expected 200-399)", now=1)
    assert not h.check_result(False, "HTTP 503 (expected 200-399)", now=2)
    assert h.routed
    assert h.check_result(False, "HTTP 503 (expected 200-399)", now=3)
    assert health(h) is Health.DOWN and h.reason == "HTTP 503 (expected 200-399)"
    assert not h.check_result(True, "HTTP 200", now=4)
    assert not h.check_result(False, "timeout after 1s", now=5)  # a failure resets the rise
    assert not h.check_result(True, "HTTP 200", now=6)
    assert h.check_result(True, "HTTP 200", now=7)
    assert health(h) is Health.UP


def test_a_pass_between_failures_resets_fall() -> None:
    h = machine(rise=1, fall=2)
    h.check_result(True, "ok", now=0)
    h.check_result(False, "bad", now=1)
    h.check_result(True, "ok", now=2)
    h.check_result(False, "bad", now=3)
    assert h.routed


def test_ejection_backoff_grows_and_probe_restores() -> None:
    h = machine(eject_after=3, eject_time=5.0, eject_max=60.0)
    h.check_result(True, "ok", now=0)
    assert not h.request_failed("connection refused", now=1, peers=ALONE_OK)
    h.request_ok()  # a success resets the count
    assert not h.request_failed("connection refused", now=2, peers=ALONE_OK)
    assert not h.request_failed("connection refused", now=2.1, peers=ALONE_OK)
    assert h.request_failed("connection refused", now=2.2, peers=ALONE_OK)
    assert health(h) is Health.EJECTED
    assert h.ejected_until == 7.2
    assert "ejected after 3 failed requests: connection refused" in h.reason
    # Probes before the deadline change nothing; the next check is the deadline.
    assert h.next_check(1.0, now=3.0) == 7.2
    assert not h.check_result(True, "ok", now=4)
    assert health(h) is Health.EJECTED
    # Probe fails at the deadline: ejected again for twice as long.
    h.check_result(False, "connection refused", now=7.2)
    assert health(h) is Health.EJECTED and h.ejected_until == 7.2 + 10.0
    h.check_result(False, "connection refused", now=17.2)
    assert h.ejected_until == 17.2 + 20.0
    h.check_result(False, "connection refused", now=37.2)
    h.check_result(False, "connection refused", now=77.2)
    assert h.ejected_until == 77.2 + 60.0  # capped
    assert h.check_result(True, "TCP connect ok", now=137.2)
    assert health(h) is Health.UP and "back after ejection" in h.reason


def test_backoff_starts_over_after_a_long_good_spell() -> None:
    h = machine(eject_after=1, eject_time=5.0, eject_max=60.0)
    h.check_result(True, "ok", now=0)
    h.request_failed("refused", now=1, peers=ALONE_OK)
    h.check_result(True, "ok", now=6)
    h.request_failed("refused", now=7, peers=ALONE_OK)
    assert h.ejected_until == 7 + 10.0
    h.check_result(True, "ok", now=17)
    h.request_failed("refused", now=1000, peers=ALONE_OK)
    assert h.ejected_until == 1000 + 5.0


def test_passive_ejection_off() -> None:
    h = machine(eject_after=0)
    h.check_result(True, "ok", now=0)
    for i in range(100):
        assert not h.request_failed("refused", now=i, peers=ALONE_OK)
    assert h.routed


def test_starting_endpoints_are_checked_often_during_grace() -> None:
    h = machine(start_grace=20.0)
    assert h.next_check(2.0, now=0.0) == FIRST_SECOND_INTERVAL
    h.check_result(False, "refused", now=0.0)
    assert h.next_check(2.0, now=0.5) == 0.5 + FIRST_SECOND_INTERVAL  # its first second
    assert h.next_check(2.0, now=1.0) == 1.0 + STARTING_INTERVAL
    assert h.next_check(2.0, now=30.0) == 32.0
    h.check_result(True, "ok", now=31)
    assert h.next_check(2.0, now=31.0) == 33.0


@pytest.mark.parametrize(
    ("peers", "percent", "refusal"),
    [
        (Peers(endpoints=1, ejected=0, other_ready=0), 100, Refusal.LAST_READY),
        (Peers(endpoints=2, ejected=0, other_ready=1), 50, None),
        (Peers(endpoints=2, ejected=1, other_ready=0), 100, Refusal.LAST_READY),
        (Peers(endpoints=3, ejected=0, other_ready=0), 100, Refusal.LAST_READY),  # others down
        (Peers(endpoints=3, ejected=0, other_ready=2), 50, None),
        (Peers(endpoints=3, ejected=1, other_ready=1), 50, Refusal.MAX_PERCENT),
        (Peers(endpoints=3, ejected=1, other_ready=1), 66, Refusal.MAX_PERCENT),
        (Peers(endpoints=3, ejected=1, other_ready=1), 67, None),
        (Peers(endpoints=3, ejected=2, other_ready=1), 100, None),
        (Peers(endpoints=4, ejected=1, other_ready=2), 50, None),
        (Peers(endpoints=4, ejected=2, other_ready=2), 50, Refusal.MAX_PERCENT),
        (Peers(endpoints=10, ejected=0, other_ready=9), 1, None),  # one may always go
        (Peers(endpoints=10, ejected=1, other_ready=8), 1, Refusal.MAX_PERCENT),
    ],
)
def test_ejection_refusal(peers: Peers, percent: int, refusal: Refusal | None) -> None:
    assert ejection_refusal(peers, percent) is refusal


def up(**limits: float) -> EndpointHealth:
    h = machine(**limits)
    h.check_result(True, "ok", now=0)
    return h


def peers_of(service: list[EndpointHealth], me: EndpointHealth) -> Peers:
    return Peers(
        endpoints=len(service),
        ejected=sum(h.health is Health.EJECTED for h in service),
        other_ready=sum(h.routed for h in service if h is not me),
    )


@pytest.mark.parametrize("percent", [1, 10, 33, 34, 50, 51, 66, 67, 99, 100])
@pytest.mark.parametrize("size", [1, 2, 3, 4, 5])
def test_failures_everywhere_never_empty_a_service(size: int, percent: int) -> None:
    """Every endpoint fails every request (a request that crashes any backend), in every order
    and with any number of endpoints already down by their active checks: passive ejection
    takes out as many as the cap allows and never the last ready one."""
    cap = max(1, size * percent // 100)
    for down in range(size):
        for order in itertools.permutations(range(size)):
            service = [up(eject_after=2, fall=1, max_ejection_percent=percent) for _ in range(size)]
            for h in service[:down]:
                h.check_result(False, "HTTP 500", now=0)
            ready_before = size - down
            now = 1.0
            for _ in range(3):  # rounds of one failed request on every routed endpoint
                for i in order:
                    me = service[i]
                    if not me.routed:
                        continue
                    now += 0.01
                    me.request_failed("connection reset", now=now, peers=peers_of(service, me))
                    ejected = sum(h.health is Health.EJECTED for h in service)
                    assert ejected <= cap
                    assert any(h.routed for h in service)
            ejected = sum(h.health is Health.EJECTED for h in service)
            assert ejected == min(cap, ready_before - 1), (down, order)
            held = [h for h in service if h.routed and h.request_failures >= 2]
            assert all(h.held_back is not None for h in held)


def test_refused_ejection_is_held_until_room_appears() -> None:
    a, b = up(eject_after=2), up(eject_after=2)
    service = [a, b]
    for now in (1.0, 1.1):
        a.request_failed("HTTP 502", now=now, peers=peers_of(service, a))
    assert a.health is Health.EJECTED and a.ejected_until == 1.1 + 5.0
    for now in (1.2, 1.3, 1.4):
        assert not b.request_failed("HTTP 502", now=now, peers=peers_of(service, b))
    assert b.routed and b.held_back is Refusal.LAST_READY and b.request_failures == 3
    # The probe brings a back; b's next failure finds room and ejects it at once.
    assert a.check_result(True, "TCP connect ok", now=6.1)
    assert b.request_failed("HTTP 502", now=6.2, peers=peers_of(service, b))
    assert b.health is Health.EJECTED and b.held_back is None
    assert "ejected after 4 failed requests: HTTP 502" in b.reason


def test_a_success_ends_the_run_and_what_was_held_back() -> None:
    h = up(eject_after=1)
    h.request_failed("HTTP 503", now=1, peers=Peers(endpoints=1, ejected=0, other_ready=0))
    assert (h.request_failures, h.held_back, h.routed) == (1, Refusal.LAST_READY, True)
    h.request_ok()
    assert (h.request_failures, h.held_back, h.routed) == (0, None, True)


def test_active_checks_still_take_down_the_last_ready_endpoint() -> None:
    h = up(fall=2, eject_after=1)
    h.request_failed("HTTP 503", now=1, peers=Peers(endpoints=1, ejected=0, other_ready=0))
    assert h.routed  # passive detection alone keeps it
    h.check_result(False, "HTTP 503 (expected 200-399)", now=2)
    assert h.check_result(False, "HTTP 503 (expected 200-399)", now=3)
    assert h.health is Health.DOWN


def test_recall_ends_the_wait_of_an_ejection_made_on_failures_alone() -> None:
    h = up(eject_after=1, eject_time=5.0)
    assert not h.recall(now=0.5)  # routed: nothing to recall
    h.request_failed("HTTP 502", now=1, peers=ALONE_OK)
    assert h.ejected_until == 6.0
    assert h.recall(now=2) and h.ejected_until == 2 and h.next_check(1.0, now=2) == 2
    assert not h.recall(now=2.1)  # once per ejection
    # The probe fails: now the ejection is confirmed and waits out its (longer) backoff.
    h.check_result(False, "connection refused", now=2.2)
    assert h.health is Health.EJECTED and h.ejected_until == 2.2 + 10.0
    assert not h.recall(now=3)
    assert h.check_result(True, "TCP connect ok", now=12.2)
