"""Configuration: durations, addresses, precedence (file < env < flags) and errors that name the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from meshd.config import NodeConfig, load_config
from meshd.core.config import LAN, LOCAL, WAN
from meshd.errors import ConfigError
from meshd.release.config import DistConfig
from meshd.units import parse_duration, parse_hostport


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("3s", 3.0),
        ("1m", 60.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("2", 2.0),
        ("0.5", 0.5),
        (" 10ms ", 0.01),
        (4, 4.0),
        (0.2, 0.2),
    ],
)
def test_parse_duration(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "fast", "3 days", "-1s", "1d", "ms", True, None, [1], "1e3s"])
def test_parse_duration_rejects(bad: object) -> None:
    with pytest.raises(ConfigError, match="probe_interval"):
        parse_duration(bad, "probe_interval")


def test_parse_hostport() -> None:
    assert parse_hostport("127.0.0.1:7788") == ("127.0.0.1", 7788)
    assert parse_hostport("[::1]:7788") == ("::1", 7788)
    assert parse_hostport("gw-1.site.example:80") == ("gw-1.site.example", 80)
    assert parse_hostport("node1", default_port=7788) == ("node1", 7788)
    assert parse_hostport("http://127.0.0.1:7789/") == ("127.0.0.1", 7789)
    assert parse_hostport("127.0.0.1:0", allow_zero=True) == ("127.0.0.1", 0)


@pytest.mark.parametrize(
    "bad",
    ["127.0.0.1", "127.0.0.1:", ":7788", "h:70000", "h:x", "::1:7788", "[::1", "h:0", 7788, "", "h:²", "h:٣"],
)
def test_parse_hostport_rejects(bad: object) -> None:
    with pytest.raises(ConfigError, match="--bind"):
        parse_hostport(bad, "--bind")


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "meshd.toml"
    p.write_text(text)
    return str(p)


def test_defaults() -> None:
    cfg = load_config({}, env={})
    assert cfg.cluster == "default"
    assert cfg.bind == "0.0.0.0:7788"
    assert cfg.api == "127.0.0.1:7789"
    assert cfg.data_dir == "/var/lib/meshd"
    assert cfg.site == "default"
    assert cfg.mdns is True
    assert cfg.profile == "lan"
    assert cfg.protocol() == LAN
    assert cfg.join == []
    assert cfg.tags == {}
    assert cfg.name  # host name


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
name = "from-file"
cluster = "file-cluster"
site = "file-site"
bind = "127.0.0.1:9000"
join = ["198.18.0.1:7788", "seed.example"]
tags = { role = "gw", rack = "3" }
profile = "wan"
mdns = true
""",
    )
    env = {"MESHD_CLUSTER": "env-cluster", "MESHD_SITE": "env-site", "MESHD_NO_MDNS": "1"}
    flags = {"config": path, "site": "flag-site", "join": [], "tag": []}
    cfg = load_config(flags, env=env)
    assert cfg.name == "from-file"  # only in the file
    assert cfg.cluster == "env-cluster"  # env beats file
    assert cfg.site == "flag-site"  # flag beats env
    assert cfg.bind == "127.0.0.1:9000"
    assert cfg.join == ["198.18.0.1:7788", "seed.example:7788"]  # default port filled in
    assert cfg.tags == {"role": "gw", "rack": "3"}
    assert cfg.mdns is False
    assert cfg.protocol() == WAN
    assert cfg.source == path

    cfg = load_config(
        {"config": path, "join": ["127.0.0.1:1"], "tag": ["a=b"]},
        env={"MESHD_JOIN": "127.0.0.1:2,127.0.0.1:3"},
    )
    assert cfg.join == ["127.0.0.1:1"]  # a list given by flag replaces the others
    assert cfg.tags == {"a": "b"}
    cfg = load_config({"config": path}, env={"MESHD_JOIN": "127.0.0.1:2, 127.0.0.1:3"})
    assert cfg.join == ["127.0.0.1:2", "127.0.0.1:3"]


def test_config_file_from_env(tmp_path: Path) -> None:
    path = write(tmp_path, 'name = "via-env-config"\n')
    assert load_config({}, env={"MESHD_CONFIG": path}).name == "via-env-config"


def test_hyphenated_keys_and_meta(tmp_path: Path) -> None:
    path = write(
        tmp_path, 'data-dir = "/tmp/x"\ncluster-key-file = "/tmp/k"\ntag = ["a=1"]\nsite = "north"\n'
    )
    cfg = load_config({"config": path}, env={})
    assert cfg.data_dir == "/tmp/x"
    assert cfg.cluster_key_file == "/tmp/k"
    assert cfg.meta() == {"site": "north", "tag:a": "1"}


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'name = "a"\nbindd = "127.0.0.1:1"\n')
    with pytest.raises(ConfigError) as e:
        load_config({"config": path}, env={})
    assert "bindd" in str(e.value)
    assert path in str(e.value)


def test_bad_value_names_the_source(tmp_path: Path) -> None:
    path = write(tmp_path, 'bind = "nowhere"\n')
    with pytest.raises(ConfigError, match="key 'bind'"):
        load_config({"config": path}, env={})
    with pytest.raises(ConfigError, match="MESHD_BIND"):
        load_config({}, env={"MESHD_BIND": "127.0.0.1:99999"})
    with pytest.raises(ConfigError, match="--bind"):
        load_config({"bind": "127.0.0.1"}, env={})
    with pytest.raises(ConfigError, match="MESHD_PROFILE"):
        load_config({}, env={"MESHD_PROFILE": "moon"})
    with pytest.raises(ConfigError, match="MESHD_INSECURE"):
        load_config({}, env={"MESHD_INSECURE": "perhaps"})
    with pytest.raises(ConfigError, match="--tag"):
        load_config({"tag": ["novalue"]}, env={})
    with pytest.raises(ConfigError, match="--name"):
        load_config({"name": "bad name!"}, env={})
    with pytest.raises(ConfigError, match="--mdns-interface"):
        load_config({"mdns_interface": ["eth0"]}, env={})


def test_broken_toml_and_missing_file(tmp_path: Path) -> None:
    path = write(tmp_path, "name = \n")
    with pytest.raises(ConfigError, match=re.escape(path)):
        load_config({"config": path}, env={})
    with pytest.raises(ConfigError, match=r"nope\.toml"):
        load_config({"config": str(tmp_path / "nope.toml")}, env={})


def test_insecure_only_on_loopback() -> None:
    with pytest.raises(ConfigError, match="--insecure"):
        load_config({"insecure": True}, env={})  # default bind 0.0.0.0
    with pytest.raises(ConfigError, match="--insecure"):
        load_config({"insecure": True, "bind": "198.18.0.1:7788"}, env={})
    cfg = load_config({"insecure": True, "bind": "127.0.0.1:7788"}, env={})
    assert cfg.insecure
    assert load_config({"bind": "[::1]:7788"}, env={"MESHD_INSECURE": "true"}).insecure


def test_protocol_overrides(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'profile = "local"\n[protocol]\nprobe_interval = "500ms"\n'
        "indirect_checks = 2\npush_pull_interval = 5\n",
    )
    env = {"MESHD_PROTOCOL__GOSSIP_NODES": "5", "MESHD_PROTOCOL__PROBE_TIMEOUT": "100ms"}
    cfg = load_config({"config": path, "protocol": ["probe_timeout=150ms"]}, env=env)
    p = cfg.protocol()
    assert p.probe_interval == 0.5
    assert p.indirect_checks == 2
    assert p.push_pull_interval == 5.0
    assert p.gossip_nodes == 5
    assert p.probe_timeout == pytest.approx(0.15)  # flag beats env
    assert p.suspicion_mult == LOCAL.suspicion_mult  # untouched fields keep the preset


def test_protocol_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"protocol\.probe_intervall"):
        load_config({"config": write(tmp_path, "[protocol]\nprobe_intervall = 1\n")}, env={})
    with pytest.raises(ConfigError, match=r"protocol\.indirect_checks"):
        load_config({"config": write(tmp_path, '[protocol]\nindirect_checks = "3s"\n')}, env={})
    with pytest.raises(ConfigError, match="MESHD_PROTOCOL__PROBE_TIMEOUT"):
        load_config({}, env={"MESHD_PROTOCOL__PROBE_TIMEOUT": "soon"})
    with pytest.raises(ConfigError, match="--protocol"):
        load_config({"protocol": ["probe_timeout"]}, env={})


def test_unrelated_meshd_env_is_ignored() -> None:
    # meshctl shares the prefix: its token must not break the daemon.
    cfg = load_config({}, env={"MESHD_API_TOKEN": "x", "MESHD_API": "http://127.0.0.1:7000"})
    assert cfg.api == "127.0.0.1:7000"


def test_later_sections_are_kept(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[[check]]
name = "disk"
kind = "disk"
[[check]]
name = "web"
http = "http://127.0.0.1:8080/"
[[query_handler]]
name = "uptime"
command = "uptime"
[dist]
upload_rate = "1MB"
""",
    )
    cfg = load_config({"config": path}, env={})
    assert [c["name"] for c in cfg.checks] == ["disk", "web"]
    assert cfg.query_handlers == [{"name": "uptime", "command": "uptime"}]
    assert cfg.extra["dist"] == {"upload_rate": "1MB"}


def test_nodeconfig_is_plain_data() -> None:
    cfg = NodeConfig(name="x", tags={"k": "v"}, site="s")
    assert cfg.meta() == {"site": "s", "tag:k": "v"}
    assert cfg.bind_hostport == ("0.0.0.0", 7788)


def test_every_layer_checks_a_value_alike(tmp_path: Path) -> None:
    # The same key and value in the file, the environment or a flag: the same result...
    path = write(tmp_path, 'join = "198.18.0.1:1, seed"\n[protocol]\ngossip_nodes = "5"\n')
    from_file = load_config({"config": path}, env={})
    from_env = load_config({}, env={"MESHD_JOIN": "198.18.0.1:1, seed", "MESHD_PROTOCOL__GOSSIP_NODES": "5"})
    from_flags = load_config({"join": ["198.18.0.1:1", "seed"], "protocol": ["gossip_nodes=5"]}, env={})
    for cfg in (from_file, from_env, from_flags):
        assert cfg.join == ["198.18.0.1:1", "seed:7788"]
        assert cfg.protocol().gossip_nodes == 5
    # ... or the same error, naming where the value came from.
    path = write(tmp_path, 'site = "bad site"\n')
    with pytest.raises(ConfigError, match=re.escape(f"{path}: key 'site': 'bad site' is not a valid name")):
        load_config({"config": path}, env={})
    with pytest.raises(ConfigError, match=r"^environment variable MESHD_SITE: 'bad site' is not a valid"):
        load_config({}, env={"MESHD_SITE": "bad site"})
    with pytest.raises(ConfigError, match=r"^--site: 'bad site' is not a valid name"):
        load_config({"site": "bad site"}, env={})


def test_dist_table_errors_name_the_file_the_table_and_the_key(tmp_path: Path) -> None:
    head = 'insecure = true\nbind = "127.0.0.1:7788"\n[dist]\n'
    path = write(tmp_path, head + "keep = 0\n")
    with pytest.raises(ConfigError) as e:
        load_config({"config": path}, env={})
    assert str(e.value) == f"{path}: [dist] keep: expected an integer >= 1, got 0"
    for line, message in [
        ('hook-timeout = "soon"', "[dist] hook-timeout: expected a duration like 250ms"),
        ('upload_rate = "fast"', "[dist] upload_rate: expected a rate like 10MB"),
        ('fsync = "yes"', "[dist] fsync: expected true or false, got 'yes'"),
        ("hook = 3", "[dist] hook: expected a command"),
        ("nope = 1", "[dist] nope: unknown key (known: "),
    ]:
        path = write(tmp_path, head + line + "\n")
        with pytest.raises(ConfigError, match=re.escape(f"{path}: {message}")):
            load_config({"config": path}, env={})
    path = write(tmp_path, head + 'keep = 2\nhook = "/bin/true"\nupload-rate = 1000\norigin_delay = "0.5"\n')
    assert load_config({"config": path}, env={}).dist_config() == DistConfig(
        keep=2, hook=("/bin/true",), upload_rate=1000.0, origin_delay=0.5
    )


def test_registry_is_off_by_default_and_set_by_file_env_or_flag(tmp_path: Path) -> None:
    assert load_config(env={}).registry is None
    assert load_config(env={}).registry_hostport is None
    f = tmp_path / "meshd.toml"
    f.write_text('registry = "127.0.0.1:5000"\n')
    assert load_config(env={}, config_file=str(f)).registry_hostport == ("127.0.0.1", 5000)
    assert load_config(env={"MESHD_REGISTRY": "127.0.0.1:5001"}).registry == "127.0.0.1:5001"
    assert load_config({"registry": "127.0.0.1:5002"}, env={}).registry == "127.0.0.1:5002"
    with pytest.raises(ConfigError, match="--registry"):
        load_config({"registry": "nope"}, env={})


def test_registry_pull_through_settings_from_file_env_and_flags(tmp_path: Path) -> None:
    cfg = load_config(env={})
    assert (cfg.registry_upstream, cfg.registry_cache_max, cfg.registry_pass_tags) == (
        [],
        10 * 1024**3,
        False,
    )
    f = tmp_path / "meshd.toml"
    f.write_text(
        'registry = "127.0.0.1:5000"\n'
        'registry-upstream = ["http://127.0.0.1:5001", "https://registry-1.docker.io/"]\n'
        'registry_cache_max = "2GiB"\nregistry-pass-tags = true\n'
    )
    cfg = load_config(env={}, config_file=str(f))
    assert cfg.registry_upstream == ["http://127.0.0.1:5001", "https://registry-1.docker.io"]
    assert (cfg.registry_cache_max, cfg.registry_pass_tags) == (2 * 1024**3, True)
    env = {
        "MESHD_REGISTRY_UPSTREAM": "http://127.0.0.1:5001,http://127.0.0.1:5002",
        "MESHD_REGISTRY_CACHE_MAX": "5MB",
    }
    cfg = load_config(env=env)
    assert (cfg.registry_upstream, cfg.registry_cache_max) == (
        ["http://127.0.0.1:5001", "http://127.0.0.1:5002"],
        5_000_000,
    )
    flags = {"registry_upstream": ["http://127.0.0.1:5003"], "registry_pass_tags": True}
    cfg = load_config(flags, env=env)
    assert (cfg.registry_upstream, cfg.registry_pass_tags) == (["http://127.0.0.1:5003"], True)
    for bad, message in [
        ("ftp://127.0.0.1/", "http:// or https://"),
        ("127.0.0.1:5001", "http:// or https://"),
        ("http://user:pw@127.0.0.1:5001", "credentials"),
        ("http://127.0.0.1:5001/?x=1", "no query"),
        ("http://127.0.0.1:99999", "not a URL"),
    ]:
        with pytest.raises(ConfigError, match=re.escape("--registry-upstream") + ".*" + re.escape(message)):
            load_config({"registry_upstream": [bad]}, env={})
    with pytest.raises(ConfigError, match="MESHD_REGISTRY_CACHE_MAX: at least 1MiB"):
        load_config(env={"MESHD_REGISTRY_CACHE_MAX": "1000"})
