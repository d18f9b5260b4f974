"""Manifests: canonical bytes, signatures, every refusal rule, targeting."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nacl.signing
import orjson
import pytest

from meshd.errors import ConfigError, DecodeError, IntegrityError
from meshd.release.chunker import chunk_tree
from meshd.release.manifest import (
    Limits,
    Manifest,
    check_release_path,
    load_public_key,
    load_signing_key,
)

SEED = bytes(range(32))
KEY = nacl.signing.SigningKey(SEED)
PUB = bytes(KEY.verify_key)
OTHER = nacl.signing.SigningKey(bytes(32))


def make_tree(tmp_path: Path) -> Path:
    root = tmp_path / "rel"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "app").write_bytes(b"\x7fELF" + bytes(range(256)) * 600)
    (root / "bin" / "app").chmod(0o755)
    (root / "README").write_bytes(b"read me\n" * 10)
    return root


@pytest.fixture
def manifest(tmp_path: Path) -> Manifest:
    tree = chunk_tree(make_tree(tmp_path))
    return Manifest.build(
        "gateway-agent",
        "4.2.0",
        tree,
        created=1_700_000_000.0,
        site="berlin",
        tags={"role": "edge"},
        origins=["https://updates.example.com/meshd/"],
    )


def test_roundtrip_and_verify(manifest: Manifest) -> None:
    signed = manifest.sign(KEY)
    doc = signed.to_bytes()
    back = Manifest.from_bytes(doc)
    back.verify([PUB])
    assert back.release_id == manifest.release_id == signed.release_id
    assert back.canonical_bytes() == manifest.canonical_bytes()
    assert back.name == "gateway-agent"
    assert back.version == "4.2.0"
    assert [f.path for f in back.files] == ["README", "bin/app"]
    assert back.files[1].mode == 0o755
    assert back.hash_alg == "blake3"
    assert back.created == "2023-11-14T22:13:20Z"
    assert back.total_size == sum(f.size for f in back.files)
    assert back.origins == ("https://updates.example.com/meshd/",)
    assert set(back.unique_chunks()) == set(back.chunks)


def test_canonical_bytes_are_sorted_json(manifest: Manifest) -> None:
    body = orjson.loads(manifest.canonical_bytes())
    assert manifest.canonical_bytes() == orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    assert list(body) == sorted(body)


def test_release_id_changes_with_content(manifest: Manifest, tmp_path: Path) -> None:
    other = Manifest.build(
        "gateway-agent", "4.2.1", chunk_tree(make_tree(tmp_path / "x")), created=1_700_000_000.0
    )
    assert other.release_id != manifest.release_id
    assert len(manifest.release_id) == 64


def test_unsigned_manifest_is_refused(manifest: Manifest) -> None:
    back = Manifest.from_bytes(manifest.to_bytes())
    with pytest.raises(IntegrityError, match="unsigned"):
        back.verify([PUB])


def test_untrusted_key_is_refused(manifest: Manifest) -> None:
    back = Manifest.from_bytes(manifest.sign(OTHER).to_bytes())
    with pytest.raises(IntegrityError, match="not trusted"):
        back.verify([PUB])
    with pytest.raises(IntegrityError, match="no publisher key is trusted"):
        back.verify([])


def test_bad_signature_is_refused(manifest: Manifest) -> None:
    raw = orjson.loads(manifest.sign(KEY).to_bytes())
    raw["manifest"]["version"] = "4.2.1"  # content changed after signing
    with pytest.raises(IntegrityError, match="bad signature"):
        Manifest.from_bytes(orjson.dumps(raw)).verify([PUB])


def test_signature_by_trusted_key_over_other_key_claim(manifest: Manifest) -> None:
    """Claiming a trusted key while signing with another fails the signature check."""
    raw = orjson.loads(manifest.sign(OTHER).to_bytes())
    raw["signature"]["key"] = base64.b64encode(PUB).decode()
    with pytest.raises(IntegrityError, match="bad signature"):
        Manifest.from_bytes(orjson.dumps(raw)).verify([PUB])


def test_unknown_fields_are_signed(manifest: Manifest) -> None:
    raw = orjson.loads(manifest.to_bytes())
    raw["manifest"]["x-note"] = "kept"
    signed = Manifest(raw["manifest"]).sign(KEY)
    signed_doc = orjson.loads(signed.to_bytes())
    signed_doc["manifest"]["x-note"] = "changed"
    with pytest.raises(IntegrityError, match="bad signature"):
        Manifest.from_bytes(orjson.dumps(signed_doc)).verify([PUB])


@pytest.mark.parametrize(
    "data",
    [b"", b"{", b"[]", b"null", b'{"manifest": 3}', b'{"manifest": {}}', b"\xff\xfe"],
)
def test_bad_json_is_a_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        Manifest.from_bytes(data)


def test_wrong_types_are_a_decode_error(manifest: Manifest) -> None:
    raw = orjson.loads(manifest.to_bytes())
    raw["manifest"]["files"][0]["size"] = "12"
    with pytest.raises(DecodeError, match="size"):
        Manifest.from_bytes(orjson.dumps(raw))


def test_bad_signature_encoding_is_a_decode_error(manifest: Manifest) -> None:
    raw = orjson.loads(manifest.sign(KEY).to_bytes())
    raw["signature"]["sig"] = "not base64!"
    with pytest.raises(DecodeError):
        Manifest.from_bytes(orjson.dumps(raw))
    raw["signature"]["sig"] = base64.b64encode(b"short").decode()
    with pytest.raises(DecodeError, match="64 bytes"):
        Manifest.from_bytes(orjson.dumps(raw))


def test_oversized_document_is_a_decode_error(manifest: Manifest) -> None:
    doc = manifest.to_bytes()
    with pytest.raises(DecodeError, match="exceeds"):
        Manifest.from_bytes(doc, Limits(max_bytes=len(doc) - 1))


def _first_chunk(body: dict[str, Any]) -> str:
    return str(body["files"][1]["chunks"][0])


EDITS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "chunk missing from table": (
        lambda b: b["chunks"].pop(_first_chunk(b)),
        "missing from the chunk table",
    ),
    "chunk size lies": (
        lambda b: b["chunks"].__setitem__(_first_chunk(b), b["chunks"][_first_chunk(b)] + 1),
        "add up to",
    ),
    "file size lies": (lambda b: b["files"][0].__setitem__("size", 1), "add up to"),
    "extra table chunk": (lambda b: b["chunks"].__setitem__("ab" * 32, 10), "unused"),
    "total lies": (lambda b: b.__setitem__("total_size", 1), "total_size"),
    "bad chunk id": (
        lambda b: b["chunks"].__setitem__("XYZ", 10),
        "64 lowercase hex",
    ),
    "huge chunk": (
        lambda b: b["chunks"].__setitem__(_first_chunk(b), 10**9),
        "has size",
    ),
    "dup file": (lambda b: b["files"].append(dict(b["files"][-1])), "sorted or duplicated"),
    "bad mode": (lambda b: b["files"][0].__setitem__("mode", 0o4755), "mode"),
    "no files": (lambda b: b.update(files=[], chunks={}, total_size=0), "no files"),
    "hash alg": (lambda b: b.__setitem__("hash", "md5"), "hash algorithm"),
    "format": (lambda b: b.__setitem__("format", 2), "format"),
    "name with slash": (lambda b: b.__setitem__("name", "../etc"), "name must match"),
    "version current": (lambda b: b.__setitem__("version", "current"), "version"),
    "hidden version": (lambda b: b.__setitem__("version", ".tmp-1"), "version"),
    "origin scheme": (lambda b: b.__setitem__("origins", ["file:///etc/passwd"]), "not http"),
}


@pytest.mark.parametrize("case", sorted(EDITS))
def test_signed_but_inconsistent_manifests_are_refused(manifest: Manifest, case: str) -> None:
    edit, message = EDITS[case]
    raw = orjson.loads(manifest.to_bytes())
    body = raw["manifest"]
    edit(body)
    m = Manifest(body)
    sig = KEY.sign(m.canonical_bytes()).signature  # a valid signature over bad content
    m2 = Manifest(body, (PUB, bytes(sig)))
    with pytest.raises(IntegrityError, match=message):
        m2.verify([PUB])
    with pytest.raises(IntegrityError):
        m.sign(KEY)  # the publisher side refuses to sign it too


@pytest.mark.parametrize(
    "path",
    ["", "/etc/passwd", "../x", "a/../../x", "a/./b", "a//b", "a/", "a\x00b", "..", ".", "x/" + "y" * 300],
)
def test_escaping_paths_are_refused(manifest: Manifest, path: str) -> None:
    raw = orjson.loads(manifest.to_bytes())
    body = raw["manifest"]
    body["files"][0]["path"] = path
    body["files"].sort(key=lambda f: f["path"])
    m = Manifest(body)
    signed = Manifest(body, (PUB, bytes(KEY.sign(m.canonical_bytes()).signature)))
    with pytest.raises(IntegrityError):
        signed.verify([PUB])
    with pytest.raises(IntegrityError):
        check_release_path(path)


def test_file_under_file_is_refused(manifest: Manifest) -> None:
    raw = orjson.loads(manifest.to_bytes())
    body = raw["manifest"]
    body["files"][0]["path"] = "bin"  # and "bin/app" exists
    body["files"].sort(key=lambda f: f["path"])
    m = Manifest(body)
    with pytest.raises(IntegrityError, match="under file"):
        m.check()


def test_good_paths_pass() -> None:
    for p in ["a", "a/b/c.txt", "..hidden", "a/...", "name with spaces", "ü/ñ"]:
        check_release_path(p)


def test_bounds_on_files_and_chunks(manifest: Manifest) -> None:
    signed = Manifest.from_bytes(manifest.sign(KEY).to_bytes())
    with pytest.raises(IntegrityError, match="files, limit 1"):
        signed.verify([PUB], Limits(max_files=1))
    with pytest.raises(IntegrityError, match="chunks, limit 1"):
        signed.verify([PUB], Limits(max_chunks=1))
    signed.verify([PUB])


def test_targeting(manifest: Manifest) -> None:
    assert manifest.matches("berlin", {"role": "edge", "hw": "x86"})
    assert not manifest.matches("paris", {"role": "edge"})
    assert not manifest.matches("berlin", {"role": "core"})
    assert not manifest.matches("berlin", {})
    raw = orjson.loads(manifest.to_bytes())["manifest"]
    raw["target"] = {"site": None, "tags": {}}
    assert Manifest(raw).matches("anywhere", {})


def test_key_files(tmp_path: Path) -> None:
    f = tmp_path / "pub.key"
    f.write_text(base64.b64encode(SEED).decode() + "\n")
    (tmp_path / "pub.key.pub").write_text(base64.b64encode(PUB).decode() + "\n")
    signer = load_signing_key(f)
    assert signer.public_key == PUB
    assert load_public_key(tmp_path / "pub.key.pub") == PUB
    assert "NaclSigner" in repr(signer)
    assert base64.b64encode(SEED).decode() not in repr(signer)
    (tmp_path / "bad").write_text("%%%")
    with pytest.raises(ConfigError, match="base64"):
        load_signing_key(tmp_path / "bad")
    (tmp_path / "short").write_text(base64.b64encode(b"x" * 5).decode())
    with pytest.raises(ConfigError, match="32 bytes"):
        load_public_key(tmp_path / "short")
    with pytest.raises(ConfigError):
        load_signing_key(tmp_path / "absent")


def test_crypto_module_signatures_interoperate(manifest: Manifest) -> None:
    """meshd.crypto.PublisherKey signs the same canonical bytes."""
    crypto = pytest.importorskip("meshd.crypto")
    key = crypto.PublisherKey(SEED)
    signed = manifest.sign(key)
    Manifest.from_bytes(signed.to_bytes()).verify([PUB])
