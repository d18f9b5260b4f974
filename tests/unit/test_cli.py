"""`meshd` and `meshctl` argument parsing, exit codes and output, and `meshd run`'s state files.

meshctl against a real API server, and the OS plumbing (sd_notify, this host's interfaces), are
in tests/integration/test_meshctl.py.
"""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from meshd import state
from meshd.cli import meshctl, meshctl_health
from meshd.cli import meshd as meshd_cli
from meshd.cli.output import table
from meshd.core.messages import MemberState
from meshd.errors import ConfigError
from tests.fakes import member

# --- meshd -----------------------------------------------------------------------------------


def test_run_flags_parse_repeatable() -> None:
    args = meshd_cli.build_parser().parse_args(
        [
            "run",
            "--name",
            "a",
            "--join",
            "h1:1",
            "--join",
            "h2:2",
            "--tag",
            "a=1",
            "--tag",
            "b=2",
            "--no-mdns",
            "--profile",
            "local",
            "--mdns-interface",
            "198.18.0.1",
        ]
    )
    assert args.join == ["h1:1", "h2:2"]
    assert args.tag == ["a=1", "b=2"]
    assert args.no_mdns is True
    assert args.insecure is None
    assert args.site is None  # not given: the environment or the file may set it


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["run", "--profile", "moon"],
        ["run", "--bogus"],
        ["keygen", "cluster"],
        ["keygen", "symmetric", "--out", "x"],
        ["frobnicate"],
    ],
)
def test_meshd_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        meshd_cli.main(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_meshd_config_error_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for k in list(os.environ):
        if k.startswith("MESHD_"):
            monkeypatch.delenv(k)
    rc = meshd_cli.main(["run", "--bind", "nowhere", "--data-dir", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("meshd: error: --bind")
    assert err.count("\n") == 1
    rc = meshd_cli.main(["run", "--insecure", "--bind", "0.0.0.0:7788", "--data-dir", str(tmp_path)])
    assert rc == 2
    assert "--insecure" in capsys.readouterr().err


def test_keygen_cluster_and_publisher(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cluster.key"
    assert meshd_cli.main(["keygen", "cluster", "--out", str(out)]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert len(base64.b64decode(out.read_text().strip())) == 32
    assert meshd_cli.main(["keygen", "cluster", "--out", str(out)]) == 2  # no silent overwrite
    assert "exists" in capsys.readouterr().err
    assert meshd_cli.main(["keygen", "cluster", "--out", str(out), "--force"]) == 0

    pub = tmp_path / "publisher.key"
    assert meshd_cli.main(["keygen", "publisher", "--out", str(pub)]) == 0
    assert stat.S_IMODE(pub.stat().st_mode) == 0o600
    assert len(base64.b64decode((tmp_path / "publisher.key.pub").read_text().strip())) == 32
    assert meshd_cli.main(["keygen", "cluster", "--out", str(tmp_path / "no/such/dir/k")]) == 2


def test_validate_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.toml"
    good.write_text('name = "gw1"\nbind = "127.0.0.1:7788"\ninsecure = true\n')
    assert meshd_cli.main(["validate-config", "--config", str(good)]) == 0
    assert "ok" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "gw1"\nprofle = "lan"\n')
    assert meshd_cli.main(["validate-config", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "profle" in err
    assert str(bad) in err
    missing_key = tmp_path / "k.toml"
    missing_key.write_text(f'cluster_key_file = "{tmp_path / "nokey"}"\n')
    assert meshd_cli.main(["validate-config", "--config", str(missing_key)]) == 2
    assert "cluster key file" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert meshd_cli.main(["version"]) == 0
    assert capsys.readouterr().out.startswith("meshd 0.")
    with pytest.raises(SystemExit) as e:  # `meshd --version`, as operators try first
        meshd_cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("meshd 0.")


# --- meshctl -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [[], ["members", "--bogus"], ["keys", "rotate"], ["join"], ["frobnicate"]],
)
def test_meshctl_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as e:
        meshctl.main(argv)
    assert e.value.code == 64  # 2 is kept for "a node is critical or missing"


def test_meshctl_bad_api_url(capsys: pytest.CaptureFixture[str]) -> None:
    assert meshctl.main(["--api", "ftp://x", "status"]) == 64
    assert "--api" in capsys.readouterr().err


def test_table_alignment() -> None:
    text = table([["a", "127.0.0.1:1"], ["long-name", "x"]], ["NAME", "ADDRESS"])
    lines = text.splitlines()
    assert lines[0] == "NAME       ADDRESS"
    assert lines[1] == "a          127.0.0.1:1"
    assert lines[2] == "long-name  x"


def test_meshctl_query_timeout_reads_durations_as_the_server_does() -> None:
    assert meshctl_health._duration_seconds("250ms") == 0.25
    assert meshctl_health._duration_seconds("2") == 2.0
    assert meshctl_health._duration_seconds("1m") == 60.0
    assert meshctl_health._duration_seconds("soon") is None  # the server says why


# --- state files of `meshd run` (meshd/state.py) ------------------------------------------------


def test_data_dir_and_token(tmp_path: Path) -> None:
    d = state.prepare_data_dir(str(tmp_path / "a" / "b"))
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    token = state.load_or_create_token(d)
    assert len(token) >= 32
    assert stat.S_IMODE((d / "api-token").stat().st_mode) == 0o600
    assert state.load_or_create_token(d) == token  # created once


def test_peer_snapshot_round_trip(tmp_path: Path) -> None:
    assert state.read_snapshot(tmp_path) == state.PeerSnapshot()  # first run: nothing to rejoin
    people = [
        member("me", addr="127.0.0.1:1"),
        member("b", MemberState.DEAD, addr="127.0.0.1:3"),
        member("a", MemberState.SUSPECT, addr="127.0.0.1:2"),
        member("c", addr="127.0.0.1:4"),
        member("gone", MemberState.LEFT, addr="127.0.0.1:5"),
    ]
    state.write_snapshot(tmp_path, "me", "id-me", "127.0.0.1:1", 7, people)
    assert stat.S_IMODE((tmp_path / state.SNAPSHOT_FILE).stat().st_mode) == 0o600
    # Alive first, then suspect, then dead; not itself, not those that left.
    assert state.read_snapshot(tmp_path) == state.PeerSnapshot(
        8, ["127.0.0.1:4", "127.0.0.1:2", "127.0.0.1:3"]
    )
    (tmp_path / state.SNAPSHOT_FILE).write_text("{broken")
    assert state.read_snapshot(tmp_path) == state.PeerSnapshot()


def test_keyring_from_the_cluster_key_file_then_from_the_data_dir(tmp_path: Path) -> None:
    key = tmp_path / "cluster.key"
    assert meshd_cli.main(["keygen", "cluster", "--out", str(key)]) == 0
    assert state.load_keyring(tmp_path, True, None) is None  # --insecure
    with pytest.raises(ConfigError, match="--cluster-key-file is required"):
        state.load_keyring(tmp_path, False, None)
    ring = state.load_keyring(tmp_path, False, str(key))
    assert ring is not None
    assert len(ring) == 1
    assert (tmp_path / state.KEYRING_FILE).exists()
    again = state.load_keyring(tmp_path, False, None)  # the saved keyring (it carries rotations)
    assert again is not None
    assert again.fingerprints() == ring.fingerprints()
