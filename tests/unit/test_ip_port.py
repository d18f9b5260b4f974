"""parse_ip_port: the only address spelling gossip may carry."""

from __future__ import annotations

import ipaddress

import pytest

from meshd.units import is_ip_port, parse_ip_port


@pytest.mark.parametrize(
    ("text", "ip", "port"),
    [
        ("198.18.0.1:7788", "198.18.0.1", 7788),
        ("127.0.0.1:1", "127.0.0.1", 1),
        ("198.19.255.254:65535", "198.19.255.254", 65535),
        ("[::1]:7788", "::1", 7788),
        ("[fd00::1:2]:9", "fd00::1:2", 9),
        ("[::ffff:198.18.0.1]:5", "::ffff:198.18.0.1", 5),
    ],
)
def test_good(text: str, ip: str, port: int) -> None:
    assert parse_ip_port(text) == (ipaddress.ip_address(ip), port)
    assert is_ip_port(text)
    assert is_ip_port(text)  # the remembered answer


@pytest.mark.parametrize(
    "text",
    [
        "",
        "gw1:7788",  # host names: a DNS lookup per message, and a way to aim traffic anywhere
        "gw1.example.com:7788",
        "localhost:7788",
        "198.18.0.1",  # no port
        "198.18.0.1:",
        "198.18.0.1:0",
        "198.18.0.1:65536",
        "198.18.0.1:99999999",
        "198.18.0.1:+80",
        "198.18.0.1:-1",
        "198.18.0.1:\uff180",  # non-ASCII digits
        "198.18.0.01:1",  # leading zeros (octal in some resolvers)
        "198.18.0:1",
        " 198.18.0.1:1",
        "198.18.0.1:1 ",
        "/run/meshd.sock:1",
        "198.18.0.1:1/path",
        "http://198.18.0.1:1",
        "::1:7788",  # IPv6 without brackets
        "[::1]",
        "[::1]:",
        "[fe80::1%eth0]:1",  # scope ids are free text
        "[198.18.0.1]:1",
        "[gw1]:1",
        "1" * 100 + ":1",
    ],
)
def test_bad(text: str) -> None:
    with pytest.raises(ValueError, match=r".+"):
        parse_ip_port(text)
    assert not is_ip_port(text)
    assert not is_ip_port(text)  # the remembered answer


def test_not_a_string() -> None:
    with pytest.raises(ValueError, match="not an IP:port"):
        parse_ip_port(7788)
