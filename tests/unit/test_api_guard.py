"""The Host/Origin policy of the operator API (api/guard.py) and its config knob: pure checks."""

from __future__ import annotations

import ipaddress

import pytest

from meshd.api.guard import AllowedHost, HostPolicy, split_authority, split_origin
from meshd.config import load_config
from meshd.errors import ConfigError

LOCAL = ("127.0.0.1", 7789)
WILDCARD = str(ipaddress.IPv4Address(0))  # a bind to every address


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("localhost", ("localhost", None)),
        ("LocalHost.:7789", ("localhost", 7789)),
        ("[::1]:80", ("::1", 80)),
        ("[0:0::1]", ("::1", None)),
        ("198.18.0.5:7789", ("198.18.0.5", 7789)),
        ("::1", None),
        ("a b", None),
        ("x:", None),
        ("x:+80", None),
        ("x:0", None),
        ("x:65536", None),
        ("[::1", None),
        ("[198.18.0.5]", None),
        ("u@h", None),
        ("", None),
    ],
)
def test_split_authority(text: str, parts: tuple[str, int | None] | None) -> None:
    assert split_authority(text) == parts


def test_split_origin() -> None:
    assert split_origin("http://localhost:7789") == ("localhost", 7789)
    assert split_origin("HTTPS://gw1.example") == ("gw1.example", None)
    assert split_origin("null") is None
    assert split_origin("ftp://localhost") is None
    assert split_origin("http://localhost/") is None


def test_policy_names() -> None:
    policy = HostPolicy([AllowedHost("gw1.example"), AllowedHost("proxy.example", 8443)])
    ok = policy.names_this_api
    assert ok("localhost", 7789, LOCAL)
    assert ok("a.localhost", None, LOCAL)
    assert ok("127.2.3.4", 7789, LOCAL)
    assert ok("::1", 7789, LOCAL)
    assert ok("gw1.example", 7789, LOCAL)
    assert ok("proxy.example", 8443, LOCAL)
    assert not ok("proxy.example", 7789, LOCAL)  # configured with its own port only
    assert not ok("localhost", 7790, LOCAL)
    assert not ok("evil.example", 7789, LOCAL)
    assert not ok("localhost.evil.example", 7789, LOCAL)
    # A wildcard bind: the address the connection arrived at names the API, the wildcard does not.
    policy.bound = (WILDCARD, 7789)
    assert ok("198.18.0.5", 7789, ("198.18.0.5", 7789))
    assert not ok("198.18.0.6", 7789, ("198.18.0.5", 7789))
    assert not ok(WILDCARD, 7789, ("198.18.0.5", 7789))
    # Bound by name: that name is the API's.
    policy.bound = ("gw9.lan", 7789)
    assert ok("gw9.lan", None, None)
    assert not ok("gw9.lan", 1, None)


def test_api_allow_host_knob() -> None:
    cfg = load_config({"api_allow_host": ["GW1.example.", "[::1]:8000"]}, env={})
    assert cfg.api_allow_hosts == ["gw1.example", "[::1]:8000"]
    assert cfg.allowed_api_hosts() == [AllowedHost("gw1.example"), AllowedHost("::1", 8000)]
    cfg = load_config({}, env={"MESHD_API_ALLOW_HOSTS": "a.example, b.example:9"})
    assert cfg.allowed_api_hosts() == [AllowedHost("a.example"), AllowedHost("b.example", 9)]
    assert load_config({}, env={}).api_allow_hosts == []
    with pytest.raises(ConfigError, match="--api-allow-host"):
        load_config({"api_allow_host": ["http://gw1.example/"]}, env={})


def test_api_allow_host_flag_is_parsed() -> None:
    from meshd.cli.meshd import build_parser

    args = build_parser().parse_args(
        ["run", "--api-allow-host", "a.example", "--api-allow-host", "b.example"]
    )
    assert args.api_allow_host == ["a.example", "b.example"]
