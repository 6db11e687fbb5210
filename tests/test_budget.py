"""The connection budget's pure core: limits from the descriptor limit, admission in all and per
source, which idle connection gives way (the oldest), release, and the rate-limited warning. No
sockets, no clock: connections are plain strings, idleness a table the test keeps."""

from __future__ import annotations

from typing import Any

import pytest

from stablenet import config
from stablenet.config import ConfigError
from stablenet.proxy.budget import PER_SOURCE, TOTAL, Admission, Budget, Limits, source_of


class Tracked:
    """A budget whose connections report idleness from a table, as a connection's own
    ``idle_since`` does: ``idle`` and ``busy`` stand for the client connection's writes."""

    def __init__(self, limits: Limits) -> None:
        self.table: dict[str, float] = {}
        self.budget: Budget[str] = Budget(
            limits, lambda conn: self.table.get(conn, 0.0), warn_every=10.0
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self.budget, name)

    def idle(self, conn: str, at: float = 1.0) -> None:
        self.table[conn] = at

    def busy(self, conn: str) -> None:
        self.table.pop(conn, None)


def budget(total: int, per_source: int, held: str = "", idle: str = "") -> Tracked:
    """A budget holding ``held`` ("conn:source ...", oldest first), of which ``idle``
    ("conn ...") are idle."""
    b = Tracked(Limits.derive(total, per_source, nofile=20000))
    for entry in held.split():
        conn, _, source = entry.partition(":")
        assert b.admit(conn, source).admitted
    for conn in idle.split():
        b.idle(conn)
    return b


def test_defaults_leave_a_reserve_and_half_the_rest_for_client_connections() -> None:
    # 20,000 descriptors: 1,024 kept for admin, DNS, health checks; half the rest for clients
    # (each may hold a backend connection); a quarter of that per source.
    assert Limits.derive(0, 0, 20000) == Limits(9488, 2372, 20000, 9488)
    # A small limit keeps a quarter of it.
    assert Limits.derive(0, 0, 256) == Limits(96, 24, 256, 96)
    # Unlimited counts as 2**20.
    assert Limits.derive(0, 0, -1).total == (2**20 - 1024) // 2


def test_configured_limits_win_and_a_source_never_gets_more_than_all() -> None:
    assert Limits.derive(100, 0, 20000) == Limits(100, 25, 20000, 9488)
    assert Limits.derive(100, 500, 20000).per_source == 100
    assert Limits.derive(0, 7, 256) == Limits(96, 7, 256, 96)


def test_admits_under_the_limits() -> None:
    b = budget(4, 2)
    assert b.admit("a1", "A") == Admission(True)
    assert b.admit("b1", "B") == Admission(True)
    assert (b.open, b.held_by("A"), b.held_by("B")) == (2, 1, 1)


def test_a_source_at_its_limit_is_refused_while_others_are_admitted() -> None:
    b = budget(10, 2, held="a1:A a2:A")
    assert b.admit("a3", "A") == Admission(False, PER_SOURCE)
    assert b.admit("b1", "B") == Admission(True)
    assert b.refused == {TOTAL: 0, PER_SOURCE: 1}
    assert b.held_by("A") == 2


def test_a_source_at_its_limit_gives_up_its_own_oldest_idle_connection() -> None:
    # b1 is the oldest of all, and idle, but it is another source's.
    b = budget(10, 3, held="b1:B a1:A a2:A a3:A", idle="b1 a2 a1")
    assert b.admit("a4", "A") == Admission(True, PER_SOURCE, ("a1",))
    assert b.admit("a5", "A") == Admission(True, PER_SOURCE, ("a2",))
    assert b.admit("a6", "A") == Admission(False, PER_SOURCE)  # a3, a4, a5 are busy
    assert b.held_by("A") == 3 and b.held_by("B") == 1
    assert b.closed_idle == {TOTAL: 0, PER_SOURCE: 2}


def test_all_sources_at_the_limit_give_up_the_oldest_idle_connection_of_any_source() -> None:
    b = budget(3, 3, held="a1:A b1:B c1:C", idle="c1 a1")
    assert b.admit("d1", "D") == Admission(True, TOTAL, ("a1",))
    assert b.admit("d2", "D") == Admission(True, TOTAL, ("c1",))
    assert b.admit("d3", "D") == Admission(False, TOTAL)
    assert (b.open, b.held_by("C"), b.held_by("D")) == (3, 0, 2)


def test_a_busy_connection_is_passed_over_until_it_is_idle_again() -> None:
    b = budget(2, 2, held="x:A y:A", idle="x y")
    b.busy("x")  # a request arrived: x may not be closed now
    assert b.idle_count == 1
    assert b.admit("z", "A").victims == ("y",)
    b.idle("x")  # answered: idle again, and the oldest
    assert b.admit("w", "A").victims == ("x",)


def test_the_search_for_an_idle_connection_is_bounded() -> None:
    from stablenet.proxy.budget import SCAN

    n = SCAN + 10
    b = budget(n, n, held=" ".join(f"c{i}:A" for i in range(n)), idle=f"c{n - 1}")
    assert b.admit("new", "A") == Admission(False, PER_SOURCE)  # the idle one is too far in
    b.idle("c5")
    assert b.admit("new", "A").victims == ("c5",)


def test_release_frees_the_slot_and_forgets_idle_ones() -> None:
    b = budget(2, 2, held="x:A y:A", idle="x")
    b.release("x")
    assert (b.open, b.idle_count, b.held_by("A")) == (1, 0, 1)
    assert b.admit("z", "A") == Admission(True)  # nothing closed: x's slot was free
    b.release("y")
    b.release("z")
    b.release("z")  # closed twice, or a victim already given up: ignored
    b.release("never-admitted")
    assert (b.open, b.held_by("A")) == (0, 0)
    b.idle("z")  # a connection the budget no longer holds never becomes a victim
    assert b.idle_count == 0
    b.admit("v", "A")  # the source, gone and back, has its idle connections tracked again
    b.admit("u", "A")
    b.idle("v")
    assert b.admit("t", "A").victims == ("v",)


def test_a_victim_released_later_changes_nothing() -> None:
    b = budget(1, 1, held="x:A", idle="x")
    assert b.admit("y", "A").victims == ("x",)
    b.release("x")  # its connection_lost comes after
    assert (b.open, b.held_by("A")) == (1, 1)


def test_the_warning_comes_at_once_then_at_most_every_period_with_the_counts() -> None:
    b = budget(1, 1, held="x:A")
    assert b.pressure(now=0.0) is None  # nothing happened
    b.admit("y", "A")
    first = b.pressure(now=100.0)
    assert first is not None
    assert first.refused == ((TOTAL, 0), (PER_SOURCE, 1))
    assert first.busiest == ("A", 1)
    assert "refused 1 at max_connections_per_source" in first.message()
    assert "max_connections 1," in first.message()
    b.admit("y", "A")
    b.idle("x")
    b.admit("z", "A")  # closes x
    assert b.pressure(now=105.0) is None  # too soon: counted for the next one
    assert b.warn_at() == 110.0  # when it is due, even if nothing else happens
    b.admit("w", "A")
    later = b.pressure(now=110.0)
    assert later is not None
    assert later.refused == ((TOTAL, 0), (PER_SOURCE, 2))
    assert later.closed_idle == ((TOTAL, 0), (PER_SOURCE, 1))
    assert "closed idle 1 at max_connections_per_source" in later.message()
    assert b.pressure(now=200.0) is None  # nothing new since
    assert b.warn_at() is None
    assert b.refused[PER_SOURCE] == 3  # the metric's counts are since start


@pytest.mark.parametrize(
    ("address", "source"),
    [
        ("127.0.0.2", "127.0.0.2"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),
        ("::ffff:10.1.2.3", "10.1.2.3"),
        ("fe80::1%eth0", "fe80::/64"),
    ],
)
def test_sources_are_ipv4_addresses_and_ipv6_64s(address: str, source: str) -> None:
    assert source_of(address) == source


def test_config_keys_take_auto_or_a_count_from_the_file_or_the_environment() -> None:
    assert config.parse("", env={}).proxy.max_connections == 0
    cfg = config.parse(
        '[proxy]\nmax_connections = 500\nmax_connections_per_source = "auto"\n',
        env={"STABLENET_PROXY_MAX_CONNECTIONS_PER_SOURCE": "50"},
    )
    assert (cfg.proxy.max_connections, cfg.proxy.max_connections_per_source) == (500, 50)
    assert config.parse("", env={"STABLENET_PROXY_MAX_CONNECTIONS": "auto"}).proxy == (
        config.parse("", env={}).proxy
    )
    with pytest.raises(ConfigError) as err:
        config.parse("[proxy]\nmax_connections = -3\n", env={})
    assert str(err.value) == (
        "proxy.max_connections: -3 is not valid: expected a whole number >= 1, "
        'or "auto" (or 0) for the default'
    )
