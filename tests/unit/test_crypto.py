"""meshd.crypto: keyring semantics, key files, node identity, publisher signatures."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from meshd import crypto
from meshd.crypto import Keyring
from meshd.errors import ConfigError, IntegrityError, StateError

KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))
KEY_C = bytes(range(2, 34))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- key ids --------------------------------------------------------------------------------------


def test_key_id_and_fingerprint() -> None:
    kid = crypto.key_id(KEY_A)
    assert len(kid) == 4
    assert kid == hashlib.blake2b(KEY_A, digest_size=4, person=b"meshd-keyid").digest()
    assert crypto.key_id(KEY_B) != kid
    assert crypto.fingerprint(KEY_A) == kid.hex()


def test_generated_keys_are_distinct() -> None:
    assert crypto.generate_cluster_key() != crypto.generate_cluster_key()
    assert len(crypto.generate_cluster_key()) == 32


# --- keyring --------------------------------------------------------------------------------------


def test_keyring_basics() -> None:
    ring = Keyring([KEY_A, KEY_B])
    assert ring.primary == KEY_A
    assert ring.keys == [KEY_A, KEY_B]
    assert ring.by_id(crypto.key_id(KEY_B)) == KEY_B
    assert ring.by_id(b"\x00\x00\x00\x01") is None
    assert ring.fingerprints() == [crypto.fingerprint(KEY_A), crypto.fingerprint(KEY_B)]
    assert KEY_B in ring
    assert len(ring) == 2


def test_keyring_primary_argument() -> None:
    assert Keyring([KEY_A, KEY_B], primary=KEY_B).keys == [KEY_B, KEY_A]
    assert Keyring([KEY_A], primary=KEY_C).keys == [KEY_C, KEY_A]
    assert Keyring([], primary=KEY_C).keys == [KEY_C]


def test_keyring_rejects_bad_keys() -> None:
    with pytest.raises(ConfigError):
        Keyring([])
    with pytest.raises(ConfigError):
        Keyring([b"short"])
    ring = Keyring([KEY_A])
    with pytest.raises(ConfigError):
        ring.install(b"x" * 31)


def test_keyring_install_use_remove() -> None:
    ring = Keyring([KEY_A])
    ring.install(KEY_B)
    ring.install(KEY_B)  # idempotent
    assert ring.keys == [KEY_A, KEY_B]
    ring.use(KEY_B)
    assert ring.primary == KEY_B
    assert ring.keys == [KEY_B, KEY_A]
    ring.remove(KEY_A)
    assert ring.keys == [KEY_B]
    assert ring.by_id(crypto.key_id(KEY_A)) is None


def test_keyring_misuse_is_state_error() -> None:
    ring = Keyring([KEY_A, KEY_B])
    with pytest.raises(StateError, match="primary"):
        ring.remove(KEY_A)
    with pytest.raises(StateError, match="not installed"):
        ring.use(KEY_C)
    with pytest.raises(StateError, match="not installed"):
        ring.remove(KEY_C)
    assert ring.keys == [KEY_A, KEY_B]  # failed operations change nothing


def test_keyring_keys_is_a_copy() -> None:
    ring = Keyring([KEY_A])
    ring.keys.append(KEY_B)
    assert ring.keys == [KEY_A]


def test_keyring_repr_hides_keys() -> None:
    text = repr(Keyring([KEY_A]))
    assert KEY_A.hex() not in text
    assert base64.b64encode(KEY_A).decode() not in text
    assert crypto.fingerprint(KEY_A) in text


def test_keyring_save_load(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    ring = Keyring([KEY_A, KEY_B], primary=KEY_B)
    ring.save(path)
    assert _mode(path) == 0o600
    assert json.loads(path.read_text()) == [
        base64.b64encode(KEY_B).decode(),
        base64.b64encode(KEY_A).decode(),
    ]
    assert Keyring.load(path).keys == [KEY_B, KEY_A]
    os.chmod(path, 0o644)
    ring.save(path)  # rewriting narrows the mode again
    assert _mode(path) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name != "keyring.json"]  # no temp files


@pytest.mark.parametrize(
    "content",
    [b"", b"{}", b"[]", b"[1]", b'["not base64!"]', b'["' + base64.b64encode(b"x" * 16) + b'"]'],
)
def test_keyring_load_errors_name_the_path(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "ring.json"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=r"ring\.json"):
        Keyring.load(path)


def test_keyring_load_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.json"):
        Keyring.load(tmp_path / "nope.json")


# --- key files ------------------------------------------------------------------------------------


def test_key_file_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "cluster.key"
    crypto.write_key_file(path, KEY_A)
    assert _mode(path) == 0o600
    assert base64.b64decode(path.read_text().strip()) == KEY_A
    assert crypto.read_key_file(path) == KEY_A


def test_key_file_tolerates_whitespace(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_text("  " + base64.b64encode(KEY_B).decode() + "\n\n")
    assert crypto.read_key_file(path) == KEY_B


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"hello world",
        base64.b64encode(b"x" * 16),
        base64.b64encode(b"x" * 33),
        b"\xff\xfe",
        b"A" * 100_000,
    ],
)
def test_bad_key_file_is_config_error_with_path(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.key"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=r"bad\.key"):
        crypto.read_key_file(path)


def test_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.key"):
        crypto.read_key_file(tmp_path / "missing.key")


def test_write_key_file_checks_length(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        crypto.write_key_file(tmp_path / "k", b"short")
    assert not (tmp_path / "k").exists()


# --- node identity --------------------------------------------------------------------------------


def test_node_identity_created_once(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    ident = crypto.NodeIdentity.load_or_create(data_dir)
    key_file = data_dir / "node.key"
    assert _mode(key_file) == 0o600
    assert len(ident.node_id) == 32
    assert ident.node_id == hashlib.blake2b(ident.public_key, digest_size=16).hexdigest()
    again = crypto.NodeIdentity.load_or_create(data_dir)
    assert again.node_id == ident.node_id
    assert again.public_key == ident.public_key
    other = crypto.NodeIdentity.load_or_create(tmp_path / "other")
    assert other.node_id != ident.node_id


def test_node_identity_sign_verify(tmp_path: Path) -> None:
    ident = crypto.NodeIdentity.load_or_create(tmp_path)
    sig = ident.sign(b"hello")
    assert len(sig) == 64
    ident.verify(b"hello", sig)
    crypto.verify_signature(ident.public_key, b"hello", sig)
    with pytest.raises(IntegrityError):
        ident.verify(b"hellO", sig)


def test_node_identity_bad_key_file(tmp_path: Path) -> None:
    (tmp_path / "node.key").write_text("garbage")
    with pytest.raises(ConfigError, match=r"node\.key"):
        crypto.NodeIdentity.load_or_create(tmp_path)


# --- publisher keys -------------------------------------------------------------------------------


def test_publisher_keypair_files(tmp_path: Path) -> None:
    out = tmp_path / "publisher.key"
    key = crypto.generate_publisher_keypair(out)
    pub_path = tmp_path / "publisher.key.pub"
    assert _mode(out) == 0o600
    assert _mode(pub_path) & 0o077 in (0o044, 0o004, 0o040, 0)  # public file: readable is fine
    assert len(base64.b64decode(out.read_text().strip())) == 32
    assert crypto.load_publisher_public(pub_path) == key.public_key
    assert crypto.load_publisher_private(out).public_key == key.public_key
    assert crypto.generate_publisher_key is crypto.generate_publisher_keypair


def test_publisher_sign_verify(tmp_path: Path) -> None:
    key = crypto.generate_publisher_keypair(tmp_path / "p")
    pub = crypto.load_publisher_public(tmp_path / "p.pub")
    manifest = b'{"name": "app", "version": "4.2"}'
    sig = crypto.load_publisher_private(tmp_path / "p").sign(manifest)
    assert sig == key.sign(manifest)  # Ed25519 is deterministic
    crypto.verify_signature(pub, manifest, sig)
    crypto.verify_manifest(pub, manifest, crypto.sign_manifest(key, manifest))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda pub, data, sig: (pub, data + b" ", sig),
        lambda pub, data, sig: (pub, data, bytes([sig[0] ^ 1]) + sig[1:]),
        lambda pub, data, sig: (pub, data, sig[:63]),
        lambda pub, data, sig: (pub[:31], data, sig),
        lambda pub, data, sig: (bytes(32), data, sig),
        lambda pub, data, sig: (crypto.PublisherKey(b"\x07" * 32).public_key, data, sig),
    ],
)
def test_bad_signatures_are_integrity_errors(mutate: object) -> None:
    key = crypto.PublisherKey(b"\x05" * 32)
    data = b"manifest"
    args = mutate(key.public_key, data, key.sign(data))  # type: ignore[operator]
    with pytest.raises(IntegrityError):
        crypto.verify_signature(*args)


def test_bad_publisher_files(tmp_path: Path) -> None:
    (tmp_path / "p.pub").write_text("not a key")
    with pytest.raises(ConfigError, match=r"p\.pub"):
        crypto.load_publisher_public(tmp_path / "p.pub")
    with pytest.raises(ConfigError, match="absent"):
        crypto.load_publisher_private(tmp_path / "absent")
