"""The autoscaler's recommendations (pure): the stable and panic windows, tolerance, bounds,
step limits, scale-down stabilization, scale to zero, and the labels."""

from __future__ import annotations

import pytest

from stablenet.config import ControllerConfig
from stablenet.controller.autoscale import Scaler, ScaleSpec, is_autoscaled, scale_spec
from stablenet.docker.translate import LabelError

SPEC = ScaleSpec(min=1, max=20, target=10, window=60, down_window=300, idle=300)


def feed(scaler: Scaler, start: float, seconds: float, load: float) -> float:
    """Samples every 100 ms from ``start`` for ``seconds`` at a constant load; returns the end."""
    steps = round(seconds * 10)
    for i in range(steps):
        scaler.sample(start + i / 10, load, active=load > 0)
    return start + steps / 10


def test_steady_load_settles_at_concurrency_over_target() -> None:
    scaler = Scaler(SPEC, 0.0, 2)
    now = feed(scaler, 0.0, 61, 35)  # 35 in flight: 4 replicas of 10
    rec = scaler.recommend(now, current=2, ready=2)
    assert rec.desired == 4 and not rec.panicking and rec.stable == pytest.approx(35)
    assert rec.reason == "concurrency 35.0 / target 10 -> 4 replicas"


def test_within_tolerance_nothing_moves() -> None:
    scaler = Scaler(SPEC, 0.0, 4)
    now = feed(scaler, 0.0, 61, 43)  # 43 / (4 * 10) = 1.075: within 10%
    assert scaler.recommend(now, current=4, ready=4).desired == 4


def test_a_burst_panics_at_once_and_never_scales_down_in_panic() -> None:
    scaler = Scaler(SPEC, 0.0, 2)
    now = feed(scaler, 0.0, 60, 10)
    now = feed(scaler, now, 3, 80)  # 80 in flight with 2 ready (capacity 20): panic
    rec = scaler.recommend(now, current=2, ready=2)
    # The 6 s average (45) decides, not the 60 s one (13.5, which would keep 2).
    assert rec.panicking and rec.desired == 5 and rec.stable < 15
    now = feed(scaler, now, 10, 0)
    assert scaler.recommend(now, current=5, ready=5).desired == 5  # still panicking


def test_bounds_and_the_step_limit_up() -> None:
    scaler = Scaler(ScaleSpec(2, 6, 10, 60, 300, 300), 0.0, 2)
    now = feed(scaler, 0.0, 61, 500)
    assert scaler.recommend(now, current=2, ready=2).desired == 6  # max
    scaler = Scaler(ScaleSpec(1, 100, 1, 60, 300, 300), 0.0, 1)
    now = feed(scaler, 0.0, 61, 100)
    assert scaler.recommend(now, current=1, ready=1).desired == 5  # +max(4, 3 x 1)
    # Within the same 15 s period the step is still measured from its start (1).
    assert scaler.recommend(now + 1, current=5, ready=5).desired == 5
    now = feed(scaler, now + 1, 15, 100)
    assert scaler.recommend(now, current=5, ready=5).desired == 20  # a new period: x4
    quiet = Scaler(ScaleSpec(3, 6, 10, 60, 300, 300), 0.0, 3)
    now = feed(quiet, 0.0, 400, 0)
    assert quiet.recommend(now, current=3, ready=3).desired == 3  # min


def test_scale_down_waits_for_the_highest_recent_recommendation() -> None:
    spec = ScaleSpec(1, 20, 10, 10, 60, 600)
    scaler = Scaler(spec, 0.0, 1)
    now = feed(scaler, 0.0, 11, 80)
    desired = scaler.recommend(now, current=1, ready=1).desired
    assert desired == 5  # +4 at most in one step
    # Oscillating load: 80, then 10, then 80 ... every 5 s. No scale-down while it lasts.
    downs = 0
    for i in range(24):
        now = feed(scaler, now, 5, 80 if i % 2 else 10)
        rec = scaler.recommend(now, current=desired, ready=desired)
        downs += rec.desired < desired
        desired = rec.desired
    assert downs == 0
    # Then steady low load: down in steps of at most half, one per 15 s, after the window.
    seen = []
    for _ in range(20):
        now = feed(scaler, now, 5, 10)
        rec = scaler.recommend(now, current=desired, ready=desired)
        if rec.desired < desired:
            seen.append((now, desired, rec.desired))
        desired = rec.desired
    assert desired == 1
    assert all(new >= old - old // 2 for _, old, new in seen)
    assert all(b[0] - a[0] >= 15 for a, b in zip(seen, seen[1:], strict=False))


def test_scale_to_zero_after_idle_and_back_on_the_first_request() -> None:
    spec = ScaleSpec(0, 5, 10, 10, 30, 20)
    scaler = Scaler(spec, 0.0, 1)
    now = feed(scaler, 0.0, 5, 3)
    assert scaler.recommend(now, current=1, ready=1).desired == 1
    now = feed(scaler, now, 19, 0)
    assert scaler.recommend(now, current=1, ready=1).desired == 1  # 19 s idle: not yet
    now = feed(scaler, now, 2, 0)
    rec = scaler.recommend(now, current=1, ready=1)
    assert rec.desired == 0 and rec.reason == "no request for 20s"
    scaler.sample(now + 0.05, 1, active=True)  # one request, held: nothing is ready
    rec = scaler.recommend(now + 0.05, current=0, ready=0)
    assert rec.desired == 1 and rec.panicking


def test_a_short_request_between_samples_still_counts_as_activity() -> None:
    spec = ScaleSpec(0, 5, 10, 10, 30, 20)
    scaler = Scaler(spec, 0.0, 1)
    now = 0.0
    for _ in range(30):  # every second one request too short to be seen in flight
        now = feed(scaler, now, 0.9, 0)
        scaler.sample(now, 0, active=True)
        now += 0.1
    assert scaler.recommend(now, current=1, ready=1).desired == 1


def test_a_fresh_scaler_does_not_scale_down_before_a_window_of_samples() -> None:
    scaler = Scaler(SPEC, 0.0, 8)  # stablenet restarted under load
    now = feed(scaler, 0.0, 5, 0)
    assert scaler.recommend(now, current=8, ready=8).desired == 8


def test_labels() -> None:
    defaults = ControllerConfig()
    assert not is_autoscaled({"stablenet.replicas": "3"})
    labels = {"stablenet.replicas.min": "0", "stablenet.scale.target": "4.5"}
    assert is_autoscaled(labels)
    spec = scale_spec(labels, "web", defaults)
    assert spec == ScaleSpec(0, 10, 4.5, 60, 300, 300)
    short = {
        "stablenet.replicas.max": "3",
        "stablenet.scale.window": "6s",
        "stablenet.scale.idle": "9s",
    }
    assert scale_spec(short, "web", defaults) == ScaleSpec(1, 3, 10, 6, 300, 9)
    with pytest.raises(LabelError, match=r"stablenet.replicas.max='0'.*at least 1"):
        scale_spec({"stablenet.replicas.max": "0"}, "web", defaults)
    with pytest.raises(LabelError, match=r"stablenet.scale.target='none'.*0.01 to 100000"):
        scale_spec({"stablenet.scale.target": "none"}, "web", defaults)
    with pytest.raises(LabelError, match=r"stablenet.scale.target='1e-320'"):
        scale_spec({"stablenet.scale.target": "1e-320"}, "web", defaults)
    with pytest.raises(LabelError, match=r"stablenet.scale.window='99999h'.*at most 1h"):
        scale_spec(
            {"stablenet.replicas.min": "1", "stablenet.scale.window": "99999h"}, "w", defaults
        )
    with pytest.raises(LabelError, match=r"stablenet.scale.window='soon'"):
        scale_spec({"stablenet.replicas.min": "1", "stablenet.scale.window": "soon"}, "w", defaults)


def test_a_fresh_scaler_of_a_service_at_zero_stays_at_zero() -> None:
    """stablenet restarted while the service was scaled to zero: nothing wakes it but a request."""
    scaler = Scaler(ScaleSpec(0, 5, 10, 10, 30, 20), 0.0, 0)
    now = feed(scaler, 0.0, 3, 0)
    assert scaler.recommend(now, current=0, ready=0).desired == 0
