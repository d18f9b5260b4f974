"""Drop-ins: FILE plus `<stem>.d/*.toml` in lexical order, later keys winning, tables merged key by
key, [[check]] entries adding up, and errors that name the drop-in and its key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from meshd.config import drop_in_files, load_config
from meshd.errors import ConfigError

BASE = 'insecure = true\nbind = "127.0.0.1:7788"\nsite = "main"\nname = "gw1"\n'


def setup(tmp_path: Path, main: str, **drop_ins: str) -> tuple[str, Path]:
    """meshd.toml and meshd.d/<name>.toml (a "_" in a keyword is a "-" in the file name)."""
    path = tmp_path / "meshd.toml"
    path.write_text(main)
    folder = tmp_path / "meshd.d"
    folder.mkdir()
    for name, text in drop_ins.items():
        (folder / f"{name.replace('_', '-')}.toml").write_text(text)
    return str(path), folder


def test_drop_ins_are_read_in_lexical_order_and_the_last_key_wins(tmp_path: Path) -> None:
    # Written out of order on purpose: the directory's order must not matter.
    path, folder = setup(
        tmp_path,
        BASE + 'cluster = "plant"\n',
        **{"x20_site": 'site = "second"\n', "x10_site": 'site = "first"\nname = "gw9"\n'},
    )
    cfg = load_config({"config": path}, env={})
    assert (cfg.site, cfg.name, cfg.cluster) == ("second", "gw9", "plant")
    assert cfg.sources == [path, str(folder / "x10-site.toml"), str(folder / "x20-site.toml")]
    assert cfg.source == path


def test_only_toml_files_count_and_a_missing_directory_is_no_drop_in(tmp_path: Path) -> None:
    path, folder = setup(tmp_path, BASE, a='site = "a"\n')
    (folder / "b.toml.disabled").write_text('site = "disabled"\n')
    (folder / ".c.toml").write_text('site = "hidden"\n')  # an editor's swap or a half-written file
    (folder / "d.toml").mkdir()
    assert drop_in_files(path) == [str(folder / "a.toml")]
    assert load_config({"config": path}, env={}).site == "a"
    lone = tmp_path / "other.toml"
    lone.write_text(BASE)
    assert drop_in_files(str(lone)) == []
    assert load_config({"config": str(lone)}, env={}).sources == [str(lone)]


def test_tables_merge_key_by_key_and_checks_add_up(tmp_path: Path) -> None:
    main = (
        BASE
        + 'tags = { role = "gateway", line = "3" }\n'
        + '[protocol]\nprobe_interval = "2s"\nsuspicion_mult = 5\n'
        + '[dist]\nkeep = 4\nhook-timeout = "5s"\n'
        + '[[check]]\nname = "mqtt"\ncommand = "true"\n'
    )
    path, _ = setup(
        tmp_path,
        main,
        a='tags = { line = "4" }\n[protocol]\nprobe-interval = "500ms"\n[dist]\nhook_timeout = "7s"\n',
        b='[[check]]\nname = "plc"\naddr = "127.0.0.1:502"\n',
    )
    cfg = load_config({"config": path}, env={})
    assert cfg.tags == {"role": "gateway", "line": "4"}
    assert cfg.protocol().probe_interval == 0.5
    assert cfg.protocol().suspicion_mult == 5
    dist = cfg.dist_config()
    assert (dist.keep, dist.hook_timeout) == (4, 7.0)
    assert [c["name"] for c in cfg.checks] == ["mqtt", "plc"]


def test_a_list_is_replaced_whole(tmp_path: Path) -> None:
    path, _ = setup(
        tmp_path, BASE + 'join = ["127.0.0.1:7001", "127.0.0.1:7002"]\n', a='join = ["127.0.0.1:7003"]\n'
    )
    assert load_config({"config": path}, env={}).join == ["127.0.0.1:7003"]


def test_environment_and_flags_still_win_over_drop_ins(tmp_path: Path) -> None:
    path, _ = setup(tmp_path, BASE, a='site = "dropin"\nname = "gw2"\n')
    cfg = load_config({"config": path, "site": "flag"}, env={"MESHD_NAME": "gw-env"})
    assert (cfg.site, cfg.name) == ("flag", "gw-env")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('site = "bad site"\n', "key 'site': 'bad site' is not a valid name"),
        ('Data-Dir = ""\n', "key 'Data-Dir': expected a non-empty string"),
        ("nope = 1\n", "key 'nope': unknown key"),
        ('[protocol]\nprobe_interval = "soon"\n', "key 'protocol.probe_interval': expected a duration"),
        ("[dist]\nkeep = 0\n", "[dist] keep: expected an integer >= 1, got 0"),
        ("[discovery]\nmax_dials = 0\n", "[discovery] max_dials: expected an integer >= 1"),
    ],
)
def test_a_bad_drop_in_is_named_with_its_key(tmp_path: Path, text: str, message: str) -> None:
    path, folder = setup(tmp_path, BASE + "[dist]\nkeep = 3\n", a='site = "fine"\n', b=text)
    with pytest.raises(ConfigError, match="^" + re.escape(f"{folder / 'b.toml'}: {message}")):
        load_config({"config": path}, env={})


def test_a_drop_in_that_is_not_toml_is_named(tmp_path: Path) -> None:
    path, folder = setup(tmp_path, BASE, a="site = \n")
    with pytest.raises(ConfigError, match="^" + re.escape(f"config file {folder / 'a.toml'}: ")):
        load_config({"config": path}, env={})


def test_checks_across_keys_run_on_the_merged_files(tmp_path: Path) -> None:
    # Each file is valid alone; bind from a later drop-in is refused with insecure from the main file.
    path, folder = setup(tmp_path, 'insecure = true\nname = "gw1"\n', a='bind = "127.0.0.1:7788"\n')
    assert load_config({"config": path}, env={}).bind == "127.0.0.1:7788"
    (folder / "b.toml").write_text('bind = "[::]:7788"\n')
    with pytest.raises(ConfigError, match="refuses to start unless bound to loopback"):
        load_config({"config": path}, env={})


def test_the_shipped_example_is_valid() -> None:
    example = Path(__file__).resolve().parents[2] / "packaging" / "meshd.toml"
    cfg = load_config({"config": str(example)}, env={})
    assert cfg.cluster_key_file == "/etc/meshd/cluster.key"
    assert cfg.data_dir == "/var/lib/meshd"


def test_validate_config_lists_the_drop_ins_and_names_a_bad_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from meshd.cli import meshd as meshd_cli

    path, folder = setup(tmp_path, BASE, a='site = "a"\n')
    assert meshd_cli.main(["validate-config", "--config", path]) == 0
    out = capsys.readouterr().out
    assert f"{folder / 'a.toml'}: read after {path}" in out
    (folder / "b.toml").write_text("profle = 1\n")
    assert meshd_cli.main(["validate-config", "--config", path]) == 2
    assert capsys.readouterr().err.startswith(f"meshd: error: {folder / 'b.toml'}: key 'profle': unknown key")
