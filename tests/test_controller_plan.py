"""The controller's pure parts: decisions, backoff and breaker, labels, replica templates and
the state directory. No engine, no sockets."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from stablenet.controller.plan import (
    Discard,
    Grow,
    Heal,
    Replica,
    Shrink,
    Start,
    View,
    backoff_delay,
    breaker_limit,
    decide,
    next_attempt,
)
from stablenet.controller.spec import Spec, creates_containers, spec_of, unreplicable
from stablenet.controller.state import ServiceState, State, StateDir
from stablenet.controller.template import replica_plan
from stablenet.docker.translate import LabelError

NOW = 1_000_000.0


def rep(cid: str, **kw: Any) -> Replica:
    fields: dict[str, Any] = {"name": f"web-{cid}", "created": NOW - 100, "status": "running"}
    fields["ready"] = True
    fields.update(kw)
    return Replica(id=cid, **fields)


def view(*replicas: Replica, desired: int | None = 2, **kw: Any) -> View:
    return View(
        name="web", replicas=replicas, desired=desired, heal=kw.pop("heal", "replace"), **kw
    )


def test_a_service_at_its_count_gets_nothing() -> None:
    assert decide(view(rep("a"), rep("b")), NOW, 10) == []


def test_a_missing_replica_is_created_from_the_newest_ready_one() -> None:
    actions = decide(view(rep("a", created=NOW - 50), rep("b", ready=False), desired=3), NOW, 10)
    assert actions == [Grow("a", "2 of 3 replicas")]


def test_surplus_removes_not_ready_first_then_newest_and_never_a_held_one() -> None:
    replicas = (
        rep("old", created=NOW - 500),
        rep("new", created=NOW - 10),
        rep("held", status="exited", ready=False, held=True, created=NOW - 1),
    )
    assert decide(view(*replicas, desired=2), NOW, 10) == [
        Shrink("new", "3 replicas for a count of 2")
    ]
    starting = rep("starting", ready=False, created=NOW - 400)
    assert decide(view(*replicas, starting, desired=3), NOW, 10)[0].target == "starting"  # type: ignore[union-attr]


def test_a_container_the_operator_stopped_keeps_its_slot() -> None:
    held = rep("b", status="exited", ready=False, held=True)
    assert decide(view(rep("a"), held, desired=2), NOW, 10) == []


def test_a_failed_container_is_replaced_or_restarted_as_labelled() -> None:
    failed = rep("b", status="exited", ready=False, failed="exited with code 3")
    assert decide(view(rep("a"), failed), NOW, 10) == [Heal("b", "replace", "exited with code 3")]
    assert decide(view(rep("a"), failed, heal="restart"), NOW, 10) == [
        Heal("b", "restart", "exited with code 3")
    ]
    # Heal only (no count): still healed.
    assert decide(view(failed, desired=None), NOW, 10) == [
        Heal("b", "replace", "exited with code 3")
    ]


def test_a_failed_container_is_discarded_when_the_count_is_met_without_it() -> None:
    failed = rep("c", status="exited", ready=False, failed="OOM-killed")
    actions = decide(view(rep("a"), rep("b"), failed), NOW, 10)
    assert actions == [Discard("c", "OOM-killed; the count is met without it")]


def test_unhealthy_waits_for_the_grace_then_heals() -> None:
    sick = rep("b", ready=False, unhealthy_since=NOW - 5)
    assert decide(view(rep("a"), sick), NOW, 10) == []
    assert decide(view(rep("a"), sick), NOW + 6, 10) == [Heal("b", "replace", "unhealthy for 11s")]


def test_backoff_and_breaker_hold_every_new_container_back() -> None:
    failed = rep("b", status="exited", ready=False, failed="exited with code 1")
    assert decide(view(rep("a"), failed, next_try=NOW + 5), NOW, 10) == []
    assert decide(view(rep("a"), failed, degraded="broken"), NOW, 10) == []
    assert decide(view(rep("a"), desired=2, next_try=NOW + 5), NOW, 10) == []
    assert decide(view(rep("a"), desired=2, degraded="broken"), NOW, 10) == []


def test_an_unreplicable_template_is_never_copied_but_can_still_shrink() -> None:
    assert decide(view(rep("a"), desired=2, refused="fixed host port"), NOW, 10) == []
    failed = rep("b", status="exited", ready=False, failed="exited with code 1")
    assert decide(view(rep("a"), failed, refused="fixed host port"), NOW, 10) == []
    assert decide(view(rep("a"), failed, heal="restart", refused="x"), NOW, 10) == [
        Heal("b", "restart", "exited with code 1")
    ]
    assert decide(view(rep("a"), rep("b"), desired=1, refused="x"), NOW, 10) != []


def test_one_operation_at_a_time_unless_below_half() -> None:
    assert decide(view(rep("a"), desired=2, in_flight=1), NOW, 10) == []
    # 0 of 4 ready: three more created at once (two in flight already counted as creating).
    starting = rep("a", ready=False)
    actions = decide(view(starting, desired=4, in_flight=1, creating=1), NOW, 10)
    assert actions == [Grow("a", "2 of 4 replicas")] * 2
    # While anything is in flight, nothing is removed.
    assert decide(view(rep("a"), rep("b"), rep("c"), desired=1, in_flight=1), NOW, 10) == []


def test_a_new_replica_that_exited_before_its_operation_judged_it_still_counts() -> None:
    # A replace is in flight and its new replica already exited; with nothing ready operations
    # may run side by side, but not a second replica for the same slot.
    old = rep("a", status="exited", ready=False, failed="exited with code 3", busy=True)
    settling = rep("b", status="exited", ready=False, ours=True, busy=True)
    assert decide(view(old, settling, desired=1, in_flight=1), NOW, 10) == []


def test_a_replica_left_unstarted_is_started_not_duplicated() -> None:
    unstarted = rep("b", status="created", ready=False, ours=True, started=False)
    assert decide(view(rep("a"), unstarted), NOW, 10) == [Start("b", "created but never started")]


def test_a_parked_replica_being_started_counts_so_no_second_one_is_started() -> None:
    older = rep("a", status="exited", ready=False, parked=True)
    newer = rep("b", status="exited", ready=False, parked=True, created=NOW - 50)
    first = decide(view(older, newer, desired=1, park=True), NOW, 10)
    assert first == [Start("b", "0 of 1 replicas: start a parked one")]
    # A pass while the start runs (0 of 1 ready: urgent) still lists it stopped: it counts.
    starting = dataclasses.replace(newer, busy=True)
    assert decide(view(older, starting, desired=1, park=True, in_flight=1), NOW, 10) == []


def test_backoff_doubles_from_the_second_failure_and_is_capped() -> None:
    delays = [backoff_delay(n, 10, 300) for n in range(1, 9)]
    assert delays == [0, 10, 20, 40, 80, 160, 300, 300]
    # A crash loop: each attempt fails at once; attempts in the first 10 minutes.
    at, attempts, streak = 0.0, 0, 0
    while at <= 600:
        attempts += 1
        streak += 1
        at += backoff_delay(streak + 1, 10, 300)
    assert attempts <= 6


def test_a_first_failure_is_acted_on_at_once_even_when_recorded_after_now() -> None:
    # A pass takes `now` before it confirms a failure, which records a later time: no wait.
    assert next_attempt(1, NOW + 0.2, NOW, 10, 300, 600) == 0.0
    assert next_attempt(0, 0.0, NOW, 10, 300, 600) == 0.0
    assert next_attempt(2, NOW + 0.2, NOW, 10, 300, 600) == NOW + 10.2
    assert next_attempt(3, NOW - 5, NOW, 10, 300, 600) == NOW + 15
    assert next_attempt(3, NOW - 601, NOW, 10, 300, 600) == 0.0  # healthy long enough


def test_breaker_limit_is_three_or_half_the_count() -> None:
    assert [breaker_limit(n, 3) for n in (None, 1, 2, 6, 7, 10)] == [3, 3, 3, 3, 4, 5]


def test_labels_read_and_refused() -> None:
    assert spec_of({"stablenet.replicas": "3"}, "web", "replace") == Spec(3, "replace")
    assert spec_of({"stablenet.heal": "Restart"}, "db", "replace") == Spec(None, "restart")
    with pytest.raises(LabelError, match=r"stablenet.replicas='-1'.*0 to 1000"):
        spec_of({"stablenet.replicas": "-1"}, "web", "replace")
    with pytest.raises(LabelError, match=r"stablenet.heal='reboot'.*replace or restart"):
        spec_of({"stablenet.heal": "reboot"}, "web", "replace")
    assert creates_containers(Spec(None, "replace"))
    assert creates_containers(Spec(2, "restart"))
    assert not creates_containers(Spec(1, "restart"))


def test_what_cannot_be_replicated_says_why() -> None:
    fixed = {"Name": "/web", "HostConfig": {"PortBindings": {"80/tcp": [{"HostPort": "8080"}]}}}
    assert "fixed host port 8080" in (unreplicable(fixed) or "")
    random_port = {"Name": "/web", "HostConfig": {"PortBindings": {"80/tcp": [{"HostPort": ""}]}}}
    assert unreplicable(random_port) is None
    compose = {"com.docker.compose.project": "shop", "com.docker.compose.service": "web"}
    named = {"Name": "/my-web", "Config": {"Labels": compose}, "HostConfig": {}}
    assert "container_name" in (unreplicable(named) or "")
    generated = {"Name": "/shop-web-1", "Config": {"Labels": compose}, "HostConfig": {}}
    assert unreplicable(generated) is None


def test_a_replica_copies_the_service_not_the_container() -> None:
    inspect = {
        "Id": "abcdef1234567890",
        "Name": "/shop-web-1",
        "Image": "sha256:feed",
        "Config": {
            "Image": "web:latest",
            "Hostname": "abcdef123456",
            "MacAddress": "02:42:ac:11:00:09",
            "Env": ["A=1"],
            "Cmd": ["serve"],
            "WorkingDir": "/srv",
            "User": "nobody",
            "Healthcheck": {"Test": ["CMD", "true"]},
            "Labels": {
                "com.docker.compose.project": "shop",
                "com.docker.compose.service": "web",
                "stablenet.replicas": "2",
            },
        },
        "HostConfig": {
            "NetworkMode": "shop_default",
            "Binds": ["/data:/data", "named:/named"],
            "RestartPolicy": {"Name": "on-failure", "MaximumRetryCount": 3},
            "Memory": 1 << 26,
        },
        "NetworkSettings": {
            "Networks": {
                "shop_default": {
                    "Aliases": ["shop-web-1", "web", "abcdef123456"],
                    "IPAMConfig": {"IPv4Address": "10.9.0.9"},
                    "MacAddress": "02:42:ac:11:00:09",
                },
                "backend": {"Aliases": ["api"], "IPAMConfig": None},
            }
        },
    }
    plan = replica_plan(inspect, "web")
    body = plan.body
    assert body["Image"] == "sha256:feed"
    assert "Hostname" not in body and "MacAddress" not in body
    assert body["Env"] == ["A=1"] and body["Cmd"] == ["serve"] and body["User"] == "nobody"
    assert body["WorkingDir"] == "/srv" and body["Healthcheck"] == {"Test": ["CMD", "true"]}
    assert body["Labels"] == {
        "stablenet.replicas": "2",
        "stablenet.service": "web",
        "stablenet.managed": "true",
    }
    assert body["HostConfig"]["Binds"] == ["/data:/data", "named:/named"]
    assert body["HostConfig"]["RestartPolicy"]["MaximumRetryCount"] == 3
    assert body["NetworkingConfig"] == {"EndpointsConfig": {"shop_default": {"Aliases": ["web"]}}}
    assert plan.networks == (("backend", {"Aliases": ["api"]}),)
    assert json.dumps(body)  # what the Engine API gets is plain JSON


def test_state_round_trips_and_a_broken_file_is_set_aside(tmp_path: Path) -> None:
    sdir = StateDir(str(tmp_path / "state"))
    sdir.prepare()
    state = State(seen_until=12.5)
    state.services["web"] = ServiceState(scale=4, held=["abc"], streak=2, last_failure=9.0)
    state.services["idle"] = ServiceState()  # nothing to keep: not written
    sdir.save(state.encode())
    loaded = sdir.load()
    assert loaded.services == {"web": state.services["web"]}
    assert loaded.seen_until == 12.5
    (tmp_path / "state" / "controller.json").write_text("{not json")
    assert sdir.load().services == {}
    assert (tmp_path / "state" / "controller.broken").read_text() == "{not json"


def test_one_holder_of_the_lock_at_a_time(tmp_path: Path) -> None:
    first, second = StateDir(str(tmp_path)), StateDir(str(tmp_path))
    assert first.lock()
    assert not second.lock()
    first.unlock()
    assert second.lock()
    second.unlock()


def test_surplus_removes_stablenet_replicas_first_and_never_an_operators_unstarted_one() -> None:
    """docker compose up recreating a container: the new one, created but not yet started,
    is the operator's work in progress: not counted, never removed."""
    replicas = (
        rep("compose", created=NOW - 900, status="exited", ready=False, held=True, replaced=True),
        rep("ours-old", created=NOW - 800, ours=True),
        rep("new", created=NOW - 1, status="created", ready=False),
    )
    assert decide(view(*replicas, desired=2), NOW, 10) == []
    more = (*replicas, rep("ours-new", created=NOW - 100, ours=True))
    # Not ours and not started: never the one removed.
    assert decide(view(*more, desired=2), NOW, 10) == [
        Shrink("ours-new", "3 replicas for a count of 2")
    ]


def test_heals_wait_for_the_operation_in_flight_even_when_few_are_ready() -> None:
    sick = [rep(c, ready=False, unhealthy_since=NOW - 60) for c in "abcd"]
    assert decide(view(*sick, desired=4), NOW, 10) == [Heal("a", "replace", "unhealthy for 60s")]
    assert decide(view(*sick, desired=4, in_flight=1), NOW, 10) == []
