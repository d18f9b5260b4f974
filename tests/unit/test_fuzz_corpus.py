"""Replay of the fuzz corpus (tests/fuzz/corpus/<target>/): every input ends in a documented outcome.

The targets are the ones the atheris harnesses run (tests/fuzz/targets.py), without atheris:
an unexpected exception, a 5xx answer or a broken round trip fails this test. Reproducers of
open findings live in tests/fuzz/crashes/<target>/ and are expected to fail until fixed.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiohttp import web

from meshd import wire
from meshd.core.messages import Ping
from meshd.release import peer
from tests.fuzz import targets as t

FUZZ = Path(__file__).resolve().parents[1] / "fuzz"
CORPUS = FUZZ / "corpus"
CRASHES = FUZZ / "crashes"


def inputs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*") if p.is_file() and not p.name.startswith(("README", ".")))


def replay(target: Callable[[bytes], None], files: list[Path]) -> list[str]:
    """Each file through the target; a line per file it did not survive."""
    failures = []
    for path in files:
        try:
            target(path.read_bytes())
        except Exception as e:  # the point: anything a target lets escape is a finding
            where = traceback.extract_tb(e.__traceback__)[-1]
            failures.append(f"{path.name}: {type(e).__name__}: {e} (at {where.filename}:{where.lineno})")
    return failures


@pytest.fixture
def make_target(request: pytest.FixtureRequest) -> Iterator[Callable[[str], Callable[[bytes], None]]]:
    made: list[Callable[[bytes], None]] = []

    def make(name: str) -> Callable[[bytes], None]:
        target = t.TARGETS[name]()
        made.append(target)
        return target

    yield make
    for target in made:
        if isinstance(target, t.HttpTarget):
            target.close()


@pytest.mark.parametrize("name", sorted(t.TARGETS))
def test_corpus_replays_with_documented_outcomes_only(
    name: str, make_target: Callable[[str], Callable[[bytes], None]]
) -> None:
    files = inputs(CORPUS / name)
    assert len(files) >= 5, f"no corpus for {name}: run scripts/fuzz_seeds.py"
    target = make_target(name)
    failures = replay(target, files)
    assert not failures, f"{len(failures)} {name} corpus input(s) escaped:\n" + "\n".join(failures)
    # Open findings (tests/fuzz/crashes/<target>/, usually none) must still fail: one that
    # passes was fixed and belongs in the corpus.
    fixed = [p.name for p in inputs(CRASHES / name) if not replay(target, [p])]
    assert not fixed, f"fixed: move {fixed} from tests/fuzz/crashes/{name}/ to tests/fuzz/corpus/{name}/"


# --- the replay catches what it should --------------------------------------------------------------


def _seed(name: str, case: str) -> Path:
    path = CORPUS / name / f"seed-{case}"
    assert path.is_file(), f"missing seed {path}: run scripts/fuzz_seeds.py"
    return path


def test_a_decoder_leaking_a_raw_exception_fails_the_replay(monkeypatch: pytest.MonkeyPatch) -> None:
    # A decoder that forgot to turn a library error into DecodeError: the wire target lets it out.
    def leaky(body: bytes | memoryview) -> list[object]:
        raise TypeError("msgspec said no")

    files = [_seed("wire", "body-msg-ping"), _seed("wire", "secure-msg-ping")]
    assert replay(t.wire_target, files) == []
    monkeypatch.setattr(wire, "decode_body", leaky)
    failures = replay(t.wire_target, files)
    assert len(failures) == 2
    assert all("TypeError: msgspec said no" in f for f in failures)


def test_a_route_answering_500_fails_the_replay(monkeypatch: pytest.MonkeyPatch) -> None:
    # A backend bug surfaces as an exception from the handler (aiohttp would answer 500).
    target = t.HttpTarget()
    try:
        files = [_seed("http", "manifest-signed")]
        assert replay(target, files) == []
        missing: dict[str, bytes] = {}
        monkeypatch.setattr(target.backend, "manifest_document", lambda rid: missing[rid])
        (failure,) = replay(target, files)
        assert failure.startswith("seed-manifest-signed: KeyError")
    finally:
        target.close()


def test_a_5xx_answer_is_a_finding() -> None:
    # An HTTP error the handler raises on purpose still counts when it is a 5xx.
    async def broken(request: web.Request) -> web.StreamResponse:
        raise web.HTTPInternalServerError()

    target = t.HttpTarget()
    try:
        route = next(
            r for r in target.app.router.routes() if r.resource and r.resource.canonical == peer.CHUNKS_PATH
        )
        route._handler = broken  # the app is frozen; swap the handler of its POST route
        (failure,) = replay(target, [_seed("http", "chunks")])
        assert "Finding: peer app answered 500" in failure
    finally:
        target.close()


def test_the_http_target_reaches_the_handlers() -> None:
    # Guard against a harness that only ever sees 4xx from the router: seeds reach each route.
    target = t.HttpTarget()
    try:
        for case in ("manifest-signed", "bitmap-signed", "chunks", "stream-push-pull"):
            target(_seed("http", case).read_bytes())
        counters = target.backend.counters
        assert counters["serve.manifests"] == counters["serve.bitmaps"] == counters["serve.pieces"] == 1
        assert target.stream.node.counters["push_pull.in"] == 1
    finally:
        target.close()


def test_the_sealed_inner_mode_opens_like_a_real_envelope() -> None:
    # Mode 2 of the wire target must produce envelopes the codec opens, or the fuzzer never
    # gets past the MAC (e.g. after an envelope format change without updating seal_inner).
    body = wire.encode_body([Ping(1, "gw-b", "gw-a", "127.0.0.1:7788")])
    inner = t.insecure_codec().seal(body)[wire.HEADER_SIZE :]
    assert t.secure_codec().unpack(t.seal_inner(inner)) == [Ping(1, "gw-b", "gw-a", "127.0.0.1:7788")]
