"""Reading an image to publish (meshd/registry/source.py): OCI layout directories, oci-archive
and docker-archive tars built here from bytes, and the images that must be refused."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest

from meshd.errors import IntegrityError
from meshd.registry.image import IMAGE_INDEX_PATH, blob_path, parse_image_index
from meshd.registry.rules import MAX_MANIFEST_BYTES
from meshd.registry.source import ImageSourceError, stage_image
from tests.oci_images import (
    OCI_MANIFEST,
    corrupt,
    make_image,
    sha,
    tar_dir,
    write_docker_archive,
    write_layout,
)


def staged_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_an_oci_layout_is_staged_with_every_blob_and_the_tag(tmp_path: Path) -> None:
    image = make_image()
    layout = write_layout(tmp_path / "layout", image)
    (layout / "blobs" / "sha256" / ("0" * 64)).write_bytes(b"unreferenced")  # left out
    out = tmp_path / "out"
    out.mkdir()
    staged = stage_image(layout, out, "org/app")
    files = staged_files(out)
    assert set(files) == {IMAGE_INDEX_PATH} | {blob_path(d) for d in image.blobs()}
    for digest, data in image.blobs().items():
        assert files[blob_path(digest)] == data
    index = parse_image_index(files[IMAGE_INDEX_PATH])
    assert index.repository == "org/app"
    assert {t: d.digest for t, d in index.tags.items()} == {"v1": image.manifest_digest}
    assert index.tags["v1"].media_type == OCI_MANIFEST
    assert (staged.blobs, staged.size) == (len(image.blobs()), sum(len(b) for b in image.blobs().values()))


def test_tags_given_override_the_layouts_names_and_default_to_the_version(tmp_path: Path) -> None:
    image = make_image()
    layout = write_layout(tmp_path / "layout", image)
    out = tmp_path / "a"
    out.mkdir()
    staged = stage_image(layout, out, "app", tags=["latest", "1.0"])
    assert sorted(staged.index.tags) == ["1.0", "latest"]
    index = json.loads((layout / "index.json").read_text())
    del index["manifests"][0]["annotations"]
    (layout / "index.json").write_text(json.dumps(index))
    out = tmp_path / "b"
    out.mkdir()
    assert list(stage_image(layout, out, "app", default_tag="2.0").index.tags) == ["2.0"]


def test_an_oci_archive_is_the_same_image(tmp_path: Path) -> None:
    image = make_image(seed=2)
    archive = tar_dir(write_layout(tmp_path / "layout", image), tmp_path / "image.tar")
    out = tmp_path / "out"
    out.mkdir()
    staged = stage_image(archive, out, "app")
    assert staged.index.tags["v1"].digest == image.manifest_digest
    assert (out / blob_path(image.manifest_digest)).read_bytes() == image.manifest


def test_a_docker_archive_becomes_an_oci_manifest_over_the_layer_tars(tmp_path: Path) -> None:
    image = make_image(seed=3)
    archive = write_docker_archive(tmp_path / "docker.tar", image, "example.com/org/app:3.1")
    out = tmp_path / "out"
    out.mkdir()
    staged = stage_image(archive, out, "org/app")
    desc = staged.index.tags["3.1"]
    manifest = orjson.loads((out / blob_path(desc.digest)).read_bytes())
    assert sha((out / blob_path(desc.digest)).read_bytes()) == desc.digest
    assert manifest["config"]["digest"] == sha(image.config)
    config = orjson.loads(image.config)
    # Uncompressed layer tars: their digests are the config's diff_ids, as containerd checks.
    assert [d["digest"] for d in manifest["layers"]] == config["rootfs"]["diff_ids"]
    assert {d["mediaType"] for d in manifest["layers"]} == {"application/vnd.oci.image.layer.v1.tar"}
    for d in manifest["layers"]:
        assert sha((out / blob_path(d["digest"])).read_bytes()) == d["digest"]


def test_a_blob_with_the_wrong_content_is_refused(tmp_path: Path) -> None:
    image = make_image()
    layout = write_layout(tmp_path / "layout", image)
    corrupt(layout / blob_path(sha(image.layers[1])))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ImageSourceError, match="has the content of"):
        stage_image(layout, out, "app")
    assert not (out / IMAGE_INDEX_PATH).exists()


def test_a_manifest_naming_a_missing_blob_is_refused(tmp_path: Path) -> None:
    image = make_image()
    missing = sha(image.layers[0])
    layout = write_layout(tmp_path / "layout", image, skip=(missing,))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(IntegrityError, match=f"references blob {missing}, which the image lacks"):
        stage_image(layout, out, "app")


def test_a_descriptor_size_that_is_not_the_blobs_is_refused(tmp_path: Path) -> None:
    image = make_image()
    layout = write_layout(tmp_path / "layout", image)
    index = json.loads((layout / "index.json").read_text())
    index["manifests"][0]["size"] += 1
    (layout / "index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(IntegrityError, match="bytes; it has"):
        stage_image(layout, out, "app")


def test_an_oversized_manifest_is_refused(tmp_path: Path) -> None:
    image = make_image()
    doc = json.loads(image.manifest)
    doc["annotations"] = {"pad": "x" * MAX_MANIFEST_BYTES}
    image.manifest = json.dumps(doc).encode()
    layout = write_layout(tmp_path / "layout", image)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(IntegrityError, match="over 4194304 bytes"):
        stage_image(layout, out, "app")


@pytest.mark.parametrize("repo", ["../x", "UPPER", "a//b", "/abs"])
def test_a_bad_repository_name_is_refused(tmp_path: Path, repo: str) -> None:
    layout = write_layout(tmp_path / "layout", make_image())
    with pytest.raises(IntegrityError, match="not a valid OCI name"):
        stage_image(layout, tmp_path, repo)


def test_an_archive_with_a_path_out_of_it_is_refused(tmp_path: Path) -> None:
    import io
    import tarfile

    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("../escaped")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    out = tmp_path / "sub" / "out"
    out.mkdir(parents=True)
    with pytest.raises(ImageSourceError, match="cannot unpack"):
        stage_image(archive, out, "app")
    assert not (tmp_path / "sub" / "escaped").exists()


def test_not_an_image(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    with pytest.raises(ImageSourceError, match="neither an OCI layout"):
        stage_image(tmp_path / "dir", tmp_path, "app")
    with pytest.raises(ImageSourceError, match="no such file"):
        stage_image(tmp_path / "nothing", tmp_path, "app")
