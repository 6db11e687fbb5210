"""The nftables rules and their differences: pure, no kernel."""

from __future__ import annotations

import json
from collections import Counter

from stablenet.vips import rules
from stablenet.vips.rules import ServicePlan, Table

VIP = "198.18.0.10"
A, B, C = ("172.17.0.2", 8080), ("172.17.0.3", 8080), ("172.17.0.4", 8080)


def _plan(weights: dict[tuple[str, int], int], previous: Table = rules.EMPTY) -> Table:
    return rules.plan([ServicePlan(VIP, {("tcp", 80): weights})], [], previous)


def test_slots_follow_weights_reduced_and_capped() -> None:
    assert rules.slot_counts({A: 2, B: 4}) == {A: 1, B: 2}
    assert rules.slot_counts({A: 0, B: 3}) == {B: 1}
    assert rules.slot_counts({A: 0}) == {}
    capped = rules.slot_counts({A: 1, B: 1000})
    assert sum(capped.values()) <= rules.MAX_SLOTS + 1 and capped[A] == 1


def test_layout_keeps_endpoints_in_place() -> None:
    first = rules.layout([], {A: 1, B: 1, C: 1})
    assert first == (A, B, C)
    # B leaves: C moves into its slot, A stays, slot 2 goes.
    assert rules.layout(first, {A: 1, C: 1}) == (A, C)
    # B comes back: appended, nothing else moves.
    assert rules.layout((A, C), {A: 1, B: 1, C: 1}) == (A, C, B)


def test_first_table_and_its_commands() -> None:
    table = _plan({A: 1, B: 1})
    assert table.services == {(VIP, "tcp", 80): 2}
    assert table.targets((VIP, "tcp", 80)) == (A, B)
    assert table.vips == {VIP} and table.hairpin == {A[0], B[0]}
    cmds = rules.diff(rules.EMPTY, table)
    assert cmds[0] == "add chain ip stablenet pick-2"
    assert f"add element ip stablenet services {{ {VIP} . tcp . 80 : goto pick-2 }}" in cmds
    assert (
        f"add element ip stablenet endpoints {{ {VIP} . tcp . 80 . 0 : 172.17.0.2 . 8080, "
        f"{VIP} . tcp . 80 . 1 : 172.17.0.3 . 8080 }}"
    ) in cmds
    assert f"add element ip stablenet vips {{ {VIP} }}" in cmds


def test_an_endpoint_leaving_is_an_incremental_change() -> None:
    old = rules.with_picks(rules.EMPTY, _plan({A: 1, B: 1, C: 1}))
    new = _plan({A: 1, C: 1}, old)
    cmds = rules.diff(old, new)
    assert cmds == [
        "add chain ip stablenet pick-2",
        "add rule ip stablenet pick-2 meta l4proto tcp dnat ip addr . port to "
        "ip daddr . meta l4proto . th dport . numgen random mod 2 map @endpoints",
        "add rule ip stablenet pick-2 meta l4proto udp dnat ip addr . port to "
        "ip daddr . meta l4proto . th dport . numgen random mod 2 map @endpoints",
        f"delete element ip stablenet services {{ {VIP} . tcp . 80 }}",
        f"delete element ip stablenet endpoints {{ {VIP} . tcp . 80 . 1, {VIP} . tcp . 80 . 2 }}",
        f"add element ip stablenet endpoints {{ {VIP} . tcp . 80 . 1 : 172.17.0.4 . 8080 }}",
        f"add element ip stablenet services {{ {VIP} . tcp . 80 : goto pick-2 }}",
        "delete element ip stablenet hairpin { 172.17.0.3 . 172.17.0.3 }",
    ]
    assert rules.diff(rules.with_picks(old, new), new) == []


def test_no_ready_endpoint_keeps_the_address_rejecting() -> None:
    old = rules.with_picks(rules.EMPTY, _plan({A: 1}))
    new = rules.plan([], [VIP], old)
    cmds = rules.diff(old, new)
    assert f"delete element ip stablenet services {{ {VIP} . tcp . 80 }}" in cmds
    assert not any("vips" in c for c in cmds)  # still in @vips: rejected, never leaked


def test_weighted_spread() -> None:
    table = _plan({A: 1, B: 3})
    assert Counter(table.targets((VIP, "tcp", 80))) == {A: 1, B: 3}


def test_many_elements_are_chunked() -> None:
    services = [
        ServicePlan(f"198.18.{i // 250}.{i % 250 + 1}", {("tcp", 80): {A: 1}}) for i in range(2500)
    ]
    cmds = rules.diff(rules.EMPTY, rules.plan(services, [], rules.EMPTY))
    assert sum(c.startswith("add element ip stablenet services") for c in cmds) == 3


def test_skeleton_and_reconcile_rewrite_fixed_rules_and_drop_unused_picks() -> None:
    kernel = Table(picks=frozenset({2, 7}))
    wanted = _plan({A: 1, B: 1})
    cmds = rules.reconcile(kernel, wanted)
    assert cmds[: len(rules.skeleton())] == rules.skeleton()
    assert "flush chain ip stablenet pick-2" in cmds
    assert cmds[-2:] == ["flush chain ip stablenet pick-7", "delete chain ip stablenet pick-7"]


def _listing(table: Table) -> dict[str, object]:
    """The JSON shape libnftables 1.0.6 lists a table in (as seen from `nft -j list table`)."""
    out: list[dict[str, object]] = [{"metainfo": {"json_schema_version": 1}}]
    out.append({"table": {"family": "ip", "name": "stablenet"}})
    out.append(
        {
            "map": {
                "name": "services",
                "elem": [
                    [{"concat": list(k)}, {"goto": {"target": f"pick-{n}"}}]
                    for k, n in table.services.items()
                ],
            }
        }
    )
    out.append(
        {
            "map": {
                "name": "endpoints",
                "elem": [
                    [{"concat": list(k)}, {"concat": list(t)}] for k, t in table.slots.items()
                ],
            }
        }
    )
    out.append({"set": {"name": "vips", "elem": sorted(table.vips)}})
    out.append({"set": {"name": "hairpin", "elem": [{"concat": [a, a]} for a in table.hairpin]}})
    out += [{"chain": {"name": f"pick-{n}"}} for n in table.picks]
    out.append({"chain": {"name": "dispatch"}})
    return {"nftables": json.loads(json.dumps(out))}


def test_parse_reads_back_what_was_written() -> None:
    table = rules.with_picks(rules.EMPTY, _plan({A: 1, B: 2}))
    assert rules.parse(_listing(table)) == table


def test_parse_refuses_a_foreign_shape() -> None:
    bad = {"nftables": [{"map": {"name": "services", "elem": [["x", {"accept": None}]]}}]}
    try:
        rules.parse(bad)
    except rules.Unreadable:
        return
    raise AssertionError("parsed a listing it does not understand")
