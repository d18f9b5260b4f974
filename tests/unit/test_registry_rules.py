"""The OCI Distribution rules of meshd/registry/rules.py: names, references, routes, Range,
Accept and error bodies."""

from __future__ import annotations

import orjson
import pytest

from meshd.registry.rules import (
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    ByteRange,
    ErrorCode,
    Kind,
    RegistryError,
    accepts,
    check_name,
    error_body,
    parse_path,
    parse_range,
    parse_reference,
)

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    "name", ["a", "library/alpine", "my-org/app.v2/web_ui", "a__b", "a---b", "x" * 255, "0/1/2"]
)
def test_valid_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "..",
        "../etc",
        "a/../b",
        "a/./b",
        "%2e%2e",
        "%2e%2e/x",
        "a/%2e%2e/b",
        "/abs",
        "a/",
        "a//b",
        "a\\b",
        "..\\x",
        "A",
        "a.-b",
        "a___b",
        "-a",
        "a_",
        "a\x00b",
        "x" * 256,
        "a:b",
    ],
)
def test_path_tricks_and_bad_names_are_name_invalid(name: str) -> None:
    with pytest.raises(RegistryError) as e:
        check_name(name)
    assert e.value.code is ErrorCode.NAME_INVALID
    assert e.value.code.status == 400


def test_references() -> None:
    assert parse_reference("v1.2_x-y").tag == "v1.2_x-y"
    assert parse_reference("_" + "a" * 127).tag
    assert parse_reference(DIGEST).digest == DIGEST
    for bad, code in [
        ("-v1", ErrorCode.MANIFEST_INVALID),
        (".v1", ErrorCode.MANIFEST_INVALID),
        ("a" * 129, ErrorCode.MANIFEST_INVALID),
        ("", ErrorCode.MANIFEST_INVALID),
        ("sha512:" + "ab" * 64, ErrorCode.DIGEST_INVALID),  # other algorithms are refused
        ("sha256:" + "AB" * 32, ErrorCode.DIGEST_INVALID),
        ("sha256:" + "ab" * 31, ErrorCode.DIGEST_INVALID),
        ("sha256:../x", ErrorCode.DIGEST_INVALID),
    ]:
        with pytest.raises(RegistryError) as e:
            parse_reference(bad)
        assert e.value.code is code, bad


def test_routes_split_the_name_at_the_last_marker() -> None:
    assert parse_path("/v2/").kind is Kind.BASE
    assert parse_path("/v2").kind is Kind.BASE
    r = parse_path("/v2/org/app/manifests/v1")
    assert (r.kind, r.name, r.reference) == (Kind.MANIFEST, "org/app", "v1")
    r = parse_path(f"/v2/a/blobs/b/blobs/{DIGEST}")  # a repository may be called "blobs"
    assert (r.kind, r.name, r.reference) == (Kind.BLOB, "a/blobs/b", DIGEST)
    r = parse_path(f"/v2/x/manifests/{DIGEST}")
    assert r.reference == DIGEST
    r = parse_path("/v2/org/app/tags/list")
    assert (r.kind, r.name) == (Kind.TAGS, "org/app")


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/v2/../x/manifests/t", ErrorCode.NAME_INVALID),
        ("/v2/%2e%2e/x/manifests/t", ErrorCode.NAME_INVALID),
        ("/v2/a/%2E%2E/b/blobs/" + DIGEST, ErrorCode.NAME_INVALID),
        ("/v2//etc/manifests/t", ErrorCode.NAME_INVALID),
        ("/v2/a%2fb/manifests/t", ErrorCode.NAME_INVALID),
        ("/v2/a/blobs/sha256:zz", ErrorCode.DIGEST_INVALID),
        ("/v2/a/blobs/v1", ErrorCode.DIGEST_INVALID),
        ("/v2/a/manifests/-t", ErrorCode.MANIFEST_INVALID),
        ("/v2/../tags/list", ErrorCode.NAME_INVALID),
        ("/v2/a/tags", ErrorCode.NAME_UNKNOWN),
        ("/v2/a/blobs/uploads/", ErrorCode.DIGEST_INVALID),
        ("/v3/a/manifests/t", ErrorCode.NAME_UNKNOWN),
        ("/etc/passwd", ErrorCode.NAME_UNKNOWN),
    ],
)
def test_bad_paths(path: str, code: ErrorCode) -> None:
    with pytest.raises(RegistryError) as e:
        parse_path(path)
    assert e.value.code is code


@pytest.mark.parametrize(
    ("header", "size", "want"),
    [
        (None, 100, None),
        ("bytes=0-9", 100, ByteRange(0, 9)),
        ("bytes=90-", 100, ByteRange(90, 99)),
        ("bytes=90-1000", 100, ByteRange(90, 99)),  # an end past the blob is clamped
        ("bytes=-10", 100, ByteRange(90, 99)),
        ("bytes=-1000", 100, ByteRange(0, 99)),
        ("bytes=99-99", 100, ByteRange(99, 99)),
        ("bytes=0-0,5-6", 100, None),  # several ranges: the whole blob
        ("items=0-9", 100, None),  # another unit: ignored
        ("bytes=9-0", 100, None),  # syntactically invalid: ignored
        ("bytes=-", 100, None),
        (" bytes=1-2 ", 100, ByteRange(1, 2)),
    ],
)
def test_ranges(header: str | None, size: int, want: ByteRange | None) -> None:
    assert parse_range(header, size) == want


@pytest.mark.parametrize(
    ("header", "size"),
    [("bytes=100-", 100), ("bytes=100-200", 100), ("bytes=-0", 100), ("bytes=0-", 0), ("bytes=-5", 0)],
)
def test_unsatisfiable_ranges_are_416(header: str, size: int) -> None:
    with pytest.raises(RegistryError) as e:
        parse_range(header, size)
    assert e.value.code.status == 416
    assert e.value.detail == {"size": size}


def test_content_range() -> None:
    r = ByteRange(10, 19)
    assert (r.length, r.content_range(100)) == (10, "bytes 10-19/100")


def test_accept() -> None:
    assert accepts([], OCI_MANIFEST)
    assert accepts([f"{DOCKER_MANIFEST}, {OCI_MANIFEST};q=0.5"], OCI_MANIFEST)
    assert accepts([DOCKER_MANIFEST, OCI_INDEX], OCI_INDEX)  # several headers
    assert not accepts([DOCKER_MANIFEST], OCI_MANIFEST)  # the client falls back on the 404
    assert accepts(["*/*"], OCI_MANIFEST)


def test_error_body_is_the_oci_shape() -> None:
    body = orjson.loads(error_body(ErrorCode.BLOB_UNKNOWN, "blob unknown", {"digest": DIGEST}))
    assert body == {
        "errors": [{"code": "BLOB_UNKNOWN", "message": "blob unknown", "detail": {"digest": DIGEST}}]
    }
    assert ErrorCode.UNSUPPORTED.status == 405
    assert ErrorCode.MANIFEST_UNKNOWN.status == 404


def test_every_code_is_its_own_and_has_a_status() -> None:
    assert len({c.name for c in ErrorCode}) == len(ErrorCode.__members__)  # no aliases
    assert {c.status for c in ErrorCode} <= {400, 404, 405, 416}
