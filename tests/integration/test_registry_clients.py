"""Real clients against meshd's registry (--registry on 127.0.0.1): two `meshd run` nodes, an
image written by the test published on the first with `meshctl publish-image`, served by the
second once the release reached it through the mesh. Debian's containerd 1.6 (its own root,
state and socket, CRI off) pulls it with a hosts.toml mirror while the "upstream" (a closed
loopback port) is down; skopeo inspects and copies it; raw HTTP checks the errors, HEAD, Range
and path tricks."""

from __future__ import annotations

import hashlib
import http.client
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.metrics_text import sample
from tests.oci_clients import Containerd, containerd_or_skip, tool
from tests.oci_images import OciImage, make_image, sha, write_layout
from tests.processes import Mesh, NodeProc, free_port

pytestmark = pytest.mark.timeout(240)
REPO = "org/app"
TAG = "v1"


class Served:
    def __init__(self, mesh: Mesh, a: NodeProc, b: NodeProc, image: OciImage, reg_a: int, reg_b: int) -> None:
        self.mesh, self.a, self.b, self.image = mesh, a, b, image
        self.reg_a, self.reg_b = reg_a, reg_b
        self.upstream = f"127.0.0.1:{free_port()}"  # nothing listens: the upstream is down

    def raw(
        self, method: str, path: str, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.reg_b, timeout=10)
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)  # the path exactly as written
            for k, v in (headers or {}).items():
                conn.putheader(k, v)
            conn.endheaders()
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("registry")
    mesh = Mesh(tmp)
    try:
        key = tmp / "publisher.key"
        mesh.run_meshd("keygen", "publisher", "--out", str(key), check=True)
        trust = ["--trust-publisher", f"{key}.pub"]
        reg_a, reg_b = free_port(), free_port()
        a = mesh.node("a").start(extra=[*trust, "--registry", f"127.0.0.1:{reg_a}"])
        b = mesh.node("b").start(join=[a.addr], extra=[*trust, "--registry", f"127.0.0.1:{reg_b}"])
        image = make_image(seed=11, layer_sizes=(5000, 300_000, 1_200_000))
        layout = write_layout(tmp / "layout", image)
        out = a.meshctl(
            "publish-image", str(layout), "--name", "app-image", "--version", "1", "--repo", REPO,
            "--key", str(key), "--json", token=True,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        rid = json.loads(out.stdout)["id"]
        mesh.wait_until(
            "b installed the image release",
            lambda: any(
                r["id"] == rid and r["state"] in ("active", "installed")
                for r in b.get("/v1/releases")["releases"]
            ),
            timeout=60,
        )
        yield Served(mesh, a, b, image, reg_a, reg_b)
    finally:
        mesh.stop_all()


def test_the_second_node_serves_the_image_it_got_through_the_mesh(served: Served) -> None:
    status, headers, body = served.raw("GET", f"/v2/{REPO}/manifests/{TAG}")
    assert status == 200
    assert body == served.image.manifest
    assert headers["docker-content-digest"] == served.image.manifest_digest
    assert headers["content-type"] == "application/vnd.oci.image.manifest.v1+json"
    for digest, data in served.image.blobs().items():
        status, headers, body = served.raw("GET", f"/v2/{REPO}/blobs/{digest}")
        assert (status, sha(body)) == (200, digest)
        assert headers["docker-content-digest"] == digest
        assert headers["accept-ranges"] == "bytes"
        assert int(headers["content-length"]) == len(data)
    images = served.b.get("/v1/images")
    rows = [(r["repository"], r["tag"], r["digest"], r["serving"]) for r in images["images"]]
    assert rows == [(REPO, TAG, served.image.manifest_digest, True)]
    assert sorted(images["images"][0]["nodes"]) == ["a", "b"]
    out = served.b.meshctl("images")
    assert out.returncode == 0, out.stderr
    assert f"{REPO}:{TAG}" in out.stdout
    assert "default:2" in out.stdout


def test_publish_image_refuses_an_image_with_a_missing_blob(served: Served, tmp_path: Path) -> None:
    image = make_image(seed=12)
    missing = sha(image.layers[1])
    layout = write_layout(tmp_path / "layout", image, skip=(missing,))
    key = served.mesh.root / "publisher.key"
    out = served.a.meshctl(
        "publish-image", str(layout), "--name", "broken", "--version", "1", "--key", str(key), token=True
    )
    assert out.returncode == 1
    assert f"references blob {missing}, which the image lacks" in out.stderr
    assert all(r["name"] != "broken" for r in served.a.get("/v1/releases")["releases"])


def test_raw_http_errors_head_range_and_path_tricks(served: Served) -> None:
    status, headers, body = served.raw("GET", "/v2/")
    assert (status, body, headers["docker-distribution-api-version"]) == (200, b"{}", "registry/2.0")
    status, headers, body = served.raw("HEAD", f"/v2/{REPO}/manifests/{TAG}")
    assert (status, body) == (200, b"")
    assert int(headers["content-length"]) == len(served.image.manifest)
    assert headers["docker-content-digest"] == served.image.manifest_digest
    layer = served.image.layers[2]
    digest = sha(layer)
    status, headers, body = served.raw("HEAD", f"/v2/{REPO}/blobs/{digest}")
    assert (status, body, int(headers["content-length"])) == (200, b"", len(layer))
    status, headers, body = served.raw("GET", f"/v2/{REPO}/blobs/{digest}", {"Range": "bytes=100-199"})
    assert (status, body) == (206, layer[100:200])
    assert headers["content-range"] == f"bytes 100-199/{len(layer)}"
    status, headers, body = served.raw("GET", f"/v2/{REPO}/blobs/{digest}", {"Range": "bytes=-10"})
    assert (status, body) == (206, layer[-10:])
    status, headers, body = served.raw("GET", f"/v2/{REPO}/blobs/{digest}", {"Range": f"bytes={len(layer)}-"})
    assert status == 416
    assert headers["content-range"] == f"bytes */{len(layer)}"

    def code(method: str, path: str, **headers: str) -> tuple[int, str]:
        status, _, body = served.raw(method, path, headers)
        return status, json.loads(body)["errors"][0]["code"]

    assert code("GET", f"/v2/{REPO}/manifests/v9") == (404, "MANIFEST_UNKNOWN")
    assert code("GET", f"/v2/{REPO}/blobs/sha256:{'0' * 64}") == (404, "BLOB_UNKNOWN")
    assert code("GET", "/v2/../x/manifests/t") == (400, "NAME_INVALID")
    assert code("GET", "/v2/%2e%2e/%2e%2e/etc/manifests/t") == (400, "NAME_INVALID")
    assert code("GET", f"/v2/{REPO}/..%2f..%2f/blobs/{digest}") == (400, "NAME_INVALID")
    assert code("GET", f"/v2/{REPO}/blobs/sha512:{'0' * 128}") == (400, "DIGEST_INVALID")
    assert code("PUT", f"/v2/{REPO}/manifests/{TAG}") == (405, "UNSUPPORTED")
    assert code("POST", f"/v2/{REPO}/blobs/uploads/") == (405, "UNSUPPORTED")
    docker_only = "application/vnd.docker.distribution.manifest.v2+json"
    assert code("GET", f"/v2/{REPO}/manifests/{TAG}", Accept=docker_only) == (404, "MANIFEST_UNKNOWN")
    metrics = served.b.text("/metrics")
    assert (sample(metrics, "meshd_registry_requests_total", kind="blob", result="hit") or 0) >= 4
    assert (sample(metrics, "meshd_registry_requests_total", kind="manifest", result="miss") or 0) >= 2
    assert (sample(metrics, "meshd_registry_served_bytes_total") or 0) >= len(layer)
    assert sample(metrics, "meshd_registry_digest_mismatches_total") == 0


def test_skopeo_inspects_and_copies_through_the_registry(served: Served, tmp_path: Path) -> None:
    skopeo = tool("skopeo")
    ref = f"docker://127.0.0.1:{served.reg_b}/{REPO}:{TAG}"
    raw = subprocess.run(
        [skopeo, "inspect", "--tls-verify=false", "--raw", ref], capture_output=True, timeout=60
    )
    assert raw.returncode == 0, raw.stderr
    assert raw.stdout == served.image.manifest
    run = subprocess.run(
        [skopeo, "inspect", "--tls-verify=false", ref], capture_output=True, timeout=60, text=True
    )
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout)
    assert info["Digest"] == served.image.manifest_digest
    assert info["Layers"] == [sha(b) for b in served.image.layers]
    assert info["RepoTags"] == [TAG]  # GET /v2/<name>/tags/list
    out = tmp_path / "copy"
    run = subprocess.run(
        [skopeo, "copy", "--src-tls-verify=false", ref, f"oci:{out}:{TAG}"],
        capture_output=True,
        timeout=120,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    for digest, data in served.image.blobs().items():
        assert (out / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes() == data
    missing = f"docker://127.0.0.1:{served.reg_b}/{REPO}:not-published"
    run = subprocess.run(
        [skopeo, "inspect", "--tls-verify=false", missing], capture_output=True, timeout=60, text=True
    )
    assert run.returncode != 0
    assert "manifest unknown" in run.stderr.lower()


@pytest.fixture
def containerd(tmp_path: Path) -> Iterator[Containerd]:
    c = containerd_or_skip(tmp_path / "containerd")
    try:
        yield c
    finally:
        c.stop()


def test_containerd_pulls_through_the_mirror_while_upstream_is_down(
    served: Served, containerd: Containerd, tmp_path: Path
) -> None:
    hosts = tmp_path / "certs.d" / served.upstream
    hosts.mkdir(parents=True)
    (hosts / "hosts.toml").write_text(
        f'server = "http://{served.upstream}"\n\n'
        f'[host."http://127.0.0.1:{served.reg_b}"]\n  capabilities = ["pull", "resolve"]\n'
    )
    ref = f"{served.upstream}/{REPO}:{TAG}"
    pull = containerd.ctr(
        "image", "pull", "--hosts-dir", str(tmp_path / "certs.d"), "--snapshotter", "native", ref
    )
    assert pull.returncode == 0, pull.stdout + pull.stderr
    listed = containerd.ctr("image", "ls")
    assert ref in listed.stdout
    assert served.image.manifest_digest in listed.stdout
    for digest, data in served.image.blobs().items():  # byte for byte, every blob
        got = containerd.ctr("content", "get", digest, binary=True)
        assert got.returncode == 0, got.stderr
        assert hashlib.sha256(got.stdout).hexdigest() == digest.removeprefix("sha256:")
        assert got.stdout == data

    missing = f"{served.upstream}/{REPO}:not-published"
    pull = containerd.ctr(
        "image", "pull", "--hosts-dir", str(tmp_path / "certs.d"), "--snapshotter", "native", missing
    )
    assert pull.returncode != 0
    # The mirror said "not found" at once; then the (down) upstream was tried and refused.
    assert "connection refused" in pull.stderr or "not found" in pull.stderr
