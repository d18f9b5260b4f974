"""Pull-through with a site cache, with real clients on loopback: Debian's docker-registry is the
upstream (loaded by skopeo from an OCI layout the test writes), behind a small counting proxy in
this process; three `meshd run` nodes of one site with --registry and --registry-upstream;
containerd 1.6 (its own root, state and socket, CRI off) pulls the image through node 1, 2 and 3
in turn. The upstream serves each blob once for the site. A node whose peer serves a corrupt
copy bans that peer for the blob and gets the right bytes elsewhere. With the upstream gone, a
fourth node of the site still pulls the image (by digest) from its neighbours."""

from __future__ import annotations

import hashlib
import http.client
import http.server
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshd.registry.site_cache import rendezvous_order
from tests.metrics_text import sample
from tests.oci_clients import Containerd, containerd_or_skip, tool
from tests.oci_images import OciImage, corrupt, make_image, sha, write_layout
from tests.processes import Mesh, NodeProc, free_port

pytestmark = pytest.mark.timeout(300)
REPO = "org/app"
TAG = "v1"
SITE = "s1"


class CountingProxy:
    """A loopback HTTP proxy in front of the upstream registry that counts what it forwards."""

    def __init__(self, backend_port: int) -> None:
        self.backend_port = backend_port
        self.requests: Counter[tuple[str, str]] = Counter()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                self._forward()

            def do_HEAD(self) -> None:
                self._forward()

            def _forward(self) -> None:
                proxy.requests[(self.command, self.path.split("?", 1)[0])] += 1
                conn = http.client.HTTPConnection("127.0.0.1", proxy.backend_port, timeout=30)
                try:
                    skip = {"host", "connection"}
                    conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    conn.putheader("Host", f"127.0.0.1:{proxy.backend_port}")
                    for k, v in self.headers.items():
                        if k.lower() not in skip:
                            conn.putheader(k, v)
                    conn.endheaders()
                    resp = conn.getresponse()
                    body = resp.read()
                finally:
                    conn.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("connection", "transfer-encoding", "content-length"):
                        self.send_header(k, v)
                # HEAD: the length of what a GET would send, as the registry said it
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(body)))
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def gets(self, kind: str, digest: str) -> int:
        return self.requests[("GET", f"/v2/{REPO}/{kind}/{digest}")]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Upstream:
    """Debian's docker-registry on a loopback port, storage under `tmp`."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        config = tmp / "registry.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: warn\n"
            f"storage:\n  filesystem:\n    rootdirectory: {tmp / 'storage'}\n"
            f"http:\n  addr: 127.0.0.1:{self.port}\n"
        )
        self.log = (tmp / "registry.log").open("wb")
        self.proc = subprocess.Popen(
            [tool("docker-registry"), "serve", str(config)], stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/v2/")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError("docker-registry did not start:\n" + (tmp / "registry.log").read_text())
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)
        self.log.close()


class Site:
    def __init__(self, mesh: Mesh, nodes: list[NodeProc], regs: dict[str, int], image: OciImage) -> None:
        self.mesh, self.nodes, self.regs, self.image = mesh, nodes, regs, image
        self.upstream: Upstream | None = None
        self.proxy: CountingProxy | None = None

    def start_node(self, name: str, join: list[str]) -> NodeProc:
        assert self.proxy is not None
        self.regs[name] = free_port()
        node = self.mesh.node(name).start(
            join=join,
            extra=[
                "--site", SITE,
                "--registry", f"127.0.0.1:{self.regs[name]}",
                "--registry-upstream", f"http://{self.proxy.host}",
            ],
        )  # fmt: skip
        self.nodes.append(node)
        return node

    def raw(self, node: str, path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.regs[node], timeout=60)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def warm(self) -> None:
        """Every blob of the image in the caches of n1..n3 (a no-op after the first test: each
        test can run alone too)."""
        assert self.proxy is not None
        for node in self.nodes[:3]:
            for digest in self.image.blobs():
                kind = "manifests" if digest == self.image.manifest_digest else "blobs"
                status, _ = self.raw(node.name, f"/v2/{REPO}/{kind}/{digest}?ns={self.proxy.host}")
                assert status == 200

    def caches_seen_by(self, node: NodeProc) -> dict[str, int]:
        return {c["node"]: c["blobs"] for c in node.get("/v1/images").get("caches", [])}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("pullthrough")
    skopeo = tool("skopeo")
    upstream = Upstream(tmp)
    mesh = Mesh(tmp)
    image = make_image(seed=21, layer_sizes=(4000, 250_000, 2_500_000))
    s = Site(mesh, [], {}, image)
    s.upstream = upstream
    try:
        layout = write_layout(tmp / "layout", image)
        push = subprocess.run(
            [skopeo, "copy", "--dest-tls-verify=false", f"oci:{layout}:{TAG}",
             f"docker://127.0.0.1:{upstream.port}/{REPO}:{TAG}"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert push.returncode == 0, push.stderr
        s.proxy = CountingProxy(upstream.port)
        first = s.start_node("n1", [])
        s.start_node("n2", [first.addr])
        s.start_node("n3", [first.addr])
        mesh.wait_until(
            "the three nodes see each other alive",
            lambda: all(sum(st == "alive" for st in n.states().values()) == 3 for n in s.nodes),
            timeout=30,
        )
        yield s
    finally:
        mesh.stop_all()
        if s.proxy is not None:
            s.proxy.stop()
        upstream.stop()


def _pull(c: Containerd, hosts_dir: Path, ref: str) -> None:
    pull = c.ctr("image", "pull", "--hosts-dir", str(hosts_dir), "--snapshotter", "native", ref)
    assert pull.returncode == 0, pull.stdout + pull.stderr


def _hosts(tmp: Path, upstream_host: str, mirror_port: int) -> Path:
    """A hosts.toml: meshd's registry as the mirror, the upstream as the server."""
    folder = tmp / f"certs.d-{mirror_port}"
    (folder / upstream_host).mkdir(parents=True)
    (folder / upstream_host / "hosts.toml").write_text(
        f'server = "http://{upstream_host}"\n\n'
        f'[host."http://127.0.0.1:{mirror_port}"]\n  capabilities = ["pull", "resolve"]\n'
    )
    return folder


def _check_content(c: Containerd, image: OciImage) -> None:
    for digest, data in image.blobs().items():
        got = c.ctr("content", "get", digest, binary=True)
        assert got.returncode == 0, got.stderr
        assert hashlib.sha256(got.stdout).hexdigest() == digest.removeprefix("sha256:")
        assert got.stdout == data


def test_each_blob_crosses_the_uplink_once_for_the_site(site: Site, tmp_path: Path) -> None:
    assert site.proxy is not None
    image = site.image
    ref = f"{site.proxy.host}/{REPO}:{TAG}"
    for node in site.nodes:
        c = containerd_or_skip(tmp_path / f"containerd-{node.name}")
        try:
            _pull(c, _hosts(tmp_path, site.proxy.host, site.regs[node.name]), ref)
            _check_content(c, image)
        finally:
            c.stop()
    # containerd resolved the tag upstream (no signed release covers it: the mirror said 404 at
    # once), then fetched everything by digest through the mirror: once per blob for the site.
    assert site.proxy.gets("manifests", image.manifest_digest) == 1
    for blob in [image.config, *image.layers]:
        assert site.proxy.gets("blobs", sha(blob)) == 1, site.proxy.requests
    upstream_bytes = 0.0
    for node in site.nodes:
        metrics = node.text("/metrics")
        upstream_bytes += sample(metrics, "meshd_registry_upstream_bytes_total") or 0
    assert upstream_bytes == sum(len(b) for b in image.blobs().values())
    metrics = site.nodes[2].text("/metrics")
    served = sum(
        sample(metrics, "meshd_registry_hits_total", kind="blob", source=s) or 0
        for s in ("cache", "peer", "upstream")
    )
    assert served >= 4  # config and three layers
    n_blobs = len(image.blobs())
    site.mesh.wait_until(
        "every node sees every cache hold the image",
        lambda: all(site.caches_seen_by(n) == {m.name: n_blobs for m in site.nodes} for n in site.nodes),
    )
    out = site.nodes[0].meshctl("images")
    assert out.returncode == 0, out.stderr
    assert "pull-through caches" in out.stdout
    assert all(n.name in out.stdout for n in site.nodes)


def test_a_corrupt_peer_is_banned_and_the_blob_comes_from_another(site: Site) -> None:
    assert site.proxy is not None
    layer = site.image.layers[2]
    digest = sha(layer)
    site.warm()
    holders = [n.name for n in site.nodes[:3]]
    victim = next(n for n in site.nodes if n.name == rendezvous_order(digest, holders)[0])
    corrupt(victim.data_dir / "registry" / "blobs" / "sha256" / digest.removeprefix("sha256:"))
    n4 = site.start_node("n4", [site.nodes[0].addr])
    site.mesh.wait_until(
        "n4 sees the three caches",
        lambda: (
            {k: v for k, v in site.caches_seen_by(n4).items() if k != "n4"}
            == {h: len(site.image.blobs()) for h in holders}
        ),
    )
    before = site.proxy.gets("blobs", digest)
    status, body = site.raw("n4", f"/v2/{REPO}/blobs/{digest}?ns={site.proxy.host}")
    assert status == 200
    assert body == layer
    metrics = n4.text("/metrics")
    assert sample(metrics, "meshd_registry_peer_bad_blobs_total") == 1
    assert sample(metrics, "meshd_registry_hits_total", kind="blob", source="peer") == 1
    assert site.proxy.gets("blobs", digest) == before  # another peer had it: no upstream trip
    assert "banned for this blob" in n4.log_path.read_text()


def test_with_the_uplink_down_a_node_pulls_from_its_neighbours(site: Site, tmp_path: Path) -> None:
    assert site.proxy is not None
    assert site.upstream is not None
    n4 = next((n for n in site.nodes if n.name == "n4"), None)
    if n4 is None:  # run alone
        site.warm()
        n4 = site.start_node("n4", [site.nodes[0].addr])
        site.mesh.wait_until("n4 sees the three caches", lambda: len(site.caches_seen_by(n4)) == 4)
    upstream_host = site.proxy.host
    site.proxy.stop()
    site.upstream.stop()
    c = containerd_or_skip(tmp_path / "containerd-down")
    try:
        # By digest: with the upstream down no one can resolve an unsigned tag (a tag that a
        # signed image release covers resolves at the mirror: test_registry_clients.py).
        ref = f"{upstream_host}/{REPO}@{site.image.manifest_digest}"
        _pull(c, _hosts(tmp_path, upstream_host, site.regs["n4"]), ref)
        _check_content(c, site.image)
    finally:
        c.stop()
    metrics = n4.text("/metrics")
    assert (sample(metrics, "meshd_registry_hits_total", kind="manifest", source="peer") or 0) >= 1
    assert sample(metrics, "meshd_registry_upstream_bytes_total") == 0
    images = n4.get("/v1/images")
    assert images["cache"]["blobs"] == len(site.image.blobs())
