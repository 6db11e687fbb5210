"""The health state machine with injected time: rise/fall, ejection backoff. No sleeps."""

from __future__ import annotations

from stablenet.health.state import STARTING_INTERVAL, EndpointHealth, Health, Thresholds


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
    assert not h.request_result(False, "connection refused", now=1)
    assert not h.request_result(True, "", now=1.1)  # a success resets the count
    assert not h.request_result(False, "connection refused", now=2)
    assert not h.request_result(False, "connection refused", now=2.1)
    assert h.request_result(False, "connection refused", now=2.2)
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
    h.request_result(False, "refused", now=1)
    h.check_result(True, "ok", now=6)
    h.request_result(False, "refused", now=7)
    assert h.ejected_until == 7 + 10.0
    h.check_result(True, "ok", now=17)
    h.request_result(False, "refused", now=1000)
    assert h.ejected_until == 1000 + 5.0


def test_passive_ejection_off() -> None:
    h = machine(eject_after=0)
    h.check_result(True, "ok", now=0)
    for i in range(100):
        assert not h.request_result(False, "refused", now=i)
    assert h.routed


def test_starting_endpoints_are_checked_often_during_grace() -> None:
    h = machine(start_grace=20.0)
    assert h.next_check(2.0, now=0.0) == STARTING_INTERVAL
    h.check_result(False, "refused", now=0.0)
    assert h.next_check(2.0, now=1.0) == 1.0 + STARTING_INTERVAL
    assert h.next_check(2.0, now=30.0) == 32.0
    h.check_result(True, "ok", now=31)
    assert h.next_check(2.0, now=31.0) == 33.0
