"""Logs: `--log-format json` writes one object per line with time, level, logger, message and the
fields a log call passes; text stays as it was; journald gets its priority prefix either way."""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshd.cli.meshd import build_parser
from meshd.config import load_config
from meshd.errors import ConfigError
from meshd.logs import JsonFormatter, fields, make_formatter, setup_logging


def record(msg: str, *args: object, level: int = logging.INFO, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("meshd.release", level, __file__, 1, msg, args, None)
    rec.__dict__.update(extra)  # what logging does with extra=
    return rec


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_line_has_the_four_keys_and_the_fields() -> None:
    rec = record("%s %s complete", "docs", "1", release="docs 1", peer="gw2")
    rec.created = 1_700_000_000.25
    line = JsonFormatter().format(rec)
    assert "\n" not in line
    assert json.loads(line) == {
        "time": "2023-11-14T22:13:20.250Z",
        "level": "info",
        "logger": "meshd.release",
        "message": "docs 1 complete",
        "release": "docs 1",
        "peer": "gw2",
    }


def test_only_what_extra_passed_is_a_field() -> None:
    assert fields(record("plain")) == {}
    assert fields(record("x", member="gw1")) == {"member": "gw1"}


def test_a_field_never_replaces_the_four_keys_and_any_value_logs() -> None:
    rec = record("real", level=logging.WARNING, addr=("127.0.0.1", 7788), path=Path("/x"))
    rec.__dict__["level"] = "forged"
    doc = json.loads(JsonFormatter().format(rec))
    assert doc["level"] == "warning"
    assert doc["message"] == "real"
    assert doc["addr"] == ["127.0.0.1", 7788]
    assert doc["path"] == "/x"


def test_an_exception_is_one_string_field_on_the_same_line() -> None:
    try:
        raise ValueError("bad chunk")
    except ValueError:
        rec = logging.LogRecord("meshd", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    line = JsonFormatter().format(rec)
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["message"] == "failed"
    assert doc["exc"].startswith("Traceback")
    assert "ValueError: bad chunk" in doc["exc"]


def test_journald_gets_the_priority_prefix_in_both_formats() -> None:
    rec = record("member %s: %s", "dead", "gw2", level=logging.WARNING, member="gw2")
    json_line = make_formatter("json", journal=True).format(rec)
    assert json_line.startswith("<4>{")
    assert json.loads(json_line[3:])["member"] == "gw2"
    assert make_formatter("text", journal=True).format(rec) == "<4>meshd.release: member dead: gw2"
    text = make_formatter("text", journal=False).format(rec)
    assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3} WARNING meshd.release: member dead: gw2", text)


def test_setup_logging_json_writes_objects_to_stderr(
    root_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging("info", "json")
    logging.getLogger("meshd").info("member %s: %s", "alive", "gw1", extra={"member": "gw1"})
    logging.getLogger("meshd").debug("not at info")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    doc = json.loads(lines[0])
    assert (doc["level"], doc["logger"], doc["message"], doc["member"]) == (
        "info",
        "meshd",
        "member alive: gw1",
        "gw1",
    )
    setup_logging("debug", "text")  # SIGHUP: the handler is replaced, not added
    logging.getLogger("meshd").debug("now %s", "text")
    (line,) = capsys.readouterr().err.splitlines()
    assert line.endswith("DEBUG meshd: now text")
    assert len(root_logger.handlers) == 1


def test_log_format_from_file_environment_and_flag(tmp_path: Path) -> None:
    assert load_config({}, env={}).log_format == "text"
    path = tmp_path / "meshd.toml"
    path.write_text('insecure = true\nbind = "127.0.0.1:7788"\nlog-format = "JSON"\n')
    assert load_config({"config": str(path)}, env={}).log_format == "json"
    assert load_config({"config": str(path)}, env={"MESHD_LOG_FORMAT": "text"}).log_format == "text"
    args = build_parser().parse_args(["run", "--log-format", "json"])
    assert load_config(vars(args), env={"MESHD_LOG_FORMAT": "text"}).log_format == "json"
    path.write_text('log_format = "xml"\n')
    with pytest.raises(ConfigError, match=re.escape(f"{path}: key 'log_format': unknown log format 'xml'")):
        load_config({"config": str(path)}, env={})
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--log-format", "xml"])


async def test_a_member_event_log_line_carries_the_member(caplog: pytest.LogCaptureFixture) -> None:
    from meshd.core.effects import MemberEvent
    from meshd.core.node import MemberState, MemberView
    from meshd.runtime import NodeRuntime
    from tests.fakes import SentDatagrams, StandInCore

    rt = NodeRuntime(StandInCore([]), udp=SentDatagrams())  # type: ignore[arg-type]
    view = MemberView("gw2", "id-gw2", "127.0.0.1:7790", MemberState.DEAD, 3, {}, 0.0)
    with caplog.at_level(logging.INFO, logger="meshd"):
        rt.member_event(MemberEvent("dead", view))
    (rec,) = [r for r in caplog.records if r.getMessage().startswith("member dead")]
    doc = json.loads(JsonFormatter().format(rec))
    assert (doc["member"], doc["event"], doc["addr"]) == ("gw2", "dead", "127.0.0.1:7790")
    await rt.close()
