"""Config parsing: defaults, the shipped file, environment overrides, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from stablenet import config
from stablenet.config import ConfigError
from stablenet.units import parse_duration, parse_hostport

SHIPPED = Path(__file__).resolve().parent.parent / "config" / "stablenet.toml"


def test_shipped_file_equals_builtin_defaults() -> None:
    assert config.load(SHIPPED, env={}) == config.parse("", env={})


def test_defaults() -> None:
    cfg = config.parse("", env={})
    assert cfg.dns.zone == "stablenet.internal"
    assert cfg.proxy.hold_timeout == 10.0
    assert cfg.proxy.balance == "p2c"
    assert cfg.admin.listen == "127.0.0.1:9180"
    assert cfg.docker.resync_interval == 30.0
    assert cfg.docker.exposed_by_default is True


def test_environment_overrides_file() -> None:
    text = '[dns]\nlisten = ["127.0.0.1:53"]\n[proxy]\nhold_timeout = "3s"\n'
    cfg = config.parse(
        text,
        env={
            "STABLENET_DNS_LISTEN": "127.0.0.1:5353, [::1]:5353",
            "STABLENET_PROXY_HOLD_TIMEOUT": "500ms",
            "STABLENET_DOCKER_EXPOSED_BY_DEFAULT": "false",
            "STABLENET_DNS_UPSTREAMS": "10.0.0.2,10.0.0.3:5300",
            "STABLENET_HEALTH_MAX_EJECTION_PERCENT": "25",
        },
    )
    assert cfg.dns.listen == ("127.0.0.1:5353", "[::1]:5353")
    assert cfg.proxy.hold_timeout == 0.5
    assert cfg.docker.exposed_by_default is False
    assert cfg.dns.upstreams == ("10.0.0.2", "10.0.0.3:5300")
    assert cfg.health.max_ejection_percent == 25


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        (
            '[proxy]\nlisten = "0.0.0.0:99999"\n',
            {},
            "proxy.listen: '0.0.0.0:99999' is not valid: expected a port number (1-65535)",
        ),
        (
            "",
            {"STABLENET_PROXY_HOLD_TIMEOUT": "soon"},
            "STABLENET_PROXY_HOLD_TIMEOUT (proxy.hold_timeout): 'soon' is not valid: "
            "expected a duration such as 500ms, 2s, 1m or 1h",
        ),
        (
            '[proxy]\nbalance = "random"\n',
            {},
            "proxy.balance: 'random' is not valid: expected one of p2c, round_robin, "
            "least_requests",
        ),
        (
            "[dns]\nlisen = []\n",
            {},
            "dns.lisen: unknown key; known keys in [dns]:",
        ),
        ("[dnz]\n", {}, "[dnz]: unknown section; known sections: dns, proxy"),
        (
            "",
            {"STABLENET_DNS_LISEN": "x"},
            "STABLENET_DNS_LISEN: unknown setting",
        ),
        (
            '[dns]\nallow = ["10.0.0.0/8", "nope"]\n',
            {},
            "dns.allow: ['10.0.0.0/8', 'nope'] is not valid: item 'nope': expected a network",
        ),
        (
            '[admin]\nlisten = "0.0.0.0:9180"\n',
            {},
            "admin.listen: '0.0.0.0:9180' is not a loopback address and admin.token is empty",
        ),
        ("[health]\nrise = 0\n", {}, "health.rise: 0 is not valid: expected a whole number >= 1"),
        (
            "",
            {"STABLENET_HEALTH_MAX_EJECTION_PERCENT": "150"},
            "STABLENET_HEALTH_MAX_EJECTION_PERCENT (health.max_ejection_percent): '150' is not"
            " valid: expected a whole number from 1 to 100",
        ),
        ("[dns\n", {}, "<config>: not valid TOML"),
        (
            '[docker]\nresync_interval = "0s"\n',
            {},
            "docker.resync_interval: '0s' is not valid: expected a duration above zero",
        ),
    ],
)
def test_errors_name_key_value_and_fix(text: str, env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.parse(text, env=env)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_admin_on_all_addresses_with_token_is_accepted() -> None:
    cfg = config.parse('[admin]\nlisten = "0.0.0.0:9180"\ntoken = "s3cret"\n', env={})
    assert cfg.admin.token == "s3cret"


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        config.load(tmp_path / "absent.toml", env={})


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("2s", 2.0), ("1m", 60.0), ("1.5m", 90.0), ("1h", 3600.0), ("3", 3.0)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "s", "-1s", "2 weeks", "1d"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_hostports() -> None:
    assert parse_hostport("127.0.0.1:53") == ("127.0.0.1", 53)
    assert parse_hostport("[::1]:8080") == ("::1", 8080)
    assert parse_hostport(":80") == ("0.0.0.0", 80)
    with pytest.raises(ValueError, match="not an IP address"):
        parse_hostport("localhost:80")


def test_admin_history_reads_a_duration_within_an_hour() -> None:
    assert config.parse("", env={}).admin.history == 600.0
    assert config.parse("", env={"STABLENET_ADMIN_HISTORY": "2m"}).admin.history == 120.0
    with pytest.raises(ConfigError) as info:
        config.parse('[admin]\nhistory = "2h"\n', env={})
    assert "admin.history: '2h'" in str(info.value) and "from 1s to 1h" in str(info.value)
