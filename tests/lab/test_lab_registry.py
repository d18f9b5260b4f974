"""A site of container hosts pulling through meshd, in the lab: Debian's docker-registry on an
upstream host in site 1 (loaded by skopeo with an image the test writes); four client hosts in
site 2, each with its own containerd 1.6 (own root, state, socket; CRI off) pointed by a hosts.toml
at its own meshd's registry on the host's loopback (127.0.0.1:5000), which pulls through from the
upstream. The link into site 2 is limited (tc tbf) and counted at the router.

(a) three hosts pull the image: every blob comes over the site's link once (the registry's access
log, the router's counters), and containerd holds it byte for byte; (b) with the site's link cut,
a fourth host that joins only then pulls the image by digest from its neighbours; (c) an image
published with `meshctl publish-image` on one host reaches the others over the LAN and pulls by
its tag with the link still cut.

Uses its own lab (prefix `mdr-`). Skipped with the reason when not root or a tool is missing.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.metrics_text import sample
from tests.oci_images import OciImage, make_image, write_layout

pytestmark = pytest.mark.timeout(600)
PREFIX = "mdr-"
SITE_RATE = "100mbit"
CLUSTER = "lab-registry"
REPO = "org/app"
UPSTREAM_PORT = 5000
MIRROR = "http://127.0.0.1:5000"  # each host's own meshd, on that host's loopback
PULL_TIMEOUT = 180.0
TOOLS = ("containerd", "ctr", "skopeo", "docker-registry", "tc")
ACCESS_RE = re.compile(
    r'"GET /v2/(\S+?)/(blobs|manifests)/(sha256:[0-9a-f]{64}) HTTP/[\d.]+" (200|206) (\d+)'
)


class RegistryLab:
    """The lab, its upstream registry, its client hosts and their meshd and containerd."""

    def __init__(self, lab: Any, lm: ModuleType, image: OciImage, pub_key: Path) -> None:
        self.lab, self.lm, self.image, self.pub_key = lab, lm, image, pub_key
        self.upstream_host = lab.hosts(1)[0]
        self.clients = lab.hosts(2)
        self.upstream = f"{self.upstream_host.ip}:{UPSTREAM_PORT}"
        self.registry_log: Path | None = None
        self.log_mark = 0  # registry log offset after the image was pushed
        self.procs: list[subprocess.Popen[bytes]] = []
        self.meshd: dict[str, subprocess.Popen[bytes]] = {}
        self.pulled_through = False

    def start_meshd(self, host: Any) -> None:
        seed = f"{self.clients[0].ip}:{self.lm.MESHD_PORT}"
        self.meshd[host.name] = self.lab.start_meshd(
            host,
            cluster=CLUSTER,
            mdns=False,
            fresh=True,
            joins=[] if host is self.clients[0] else [seed],
            extra=[
                "--registry", "127.0.0.1:5000",
                "--registry-upstream", f"http://{self.upstream}",
                "--trust-publisher", f"{self.pub_key}.pub",
            ],
        )  # fmt: skip

    def wait_alive(self, hosts: list[Any]) -> None:
        def meshed() -> bool:
            views = [self.lab.member_states(h) or {} for h in hosts]
            return all(sum(s == "alive" for s in v.values()) == len(hosts) for v in views)

        self.lm.wait_until(meshed, timeout=60, what="the site's meshd nodes see each other alive")

    def metrics(self, host: Any) -> str:
        code = (
            "import urllib.request;print(urllib.request.urlopen("
            f"'http://127.0.0.1:{self.lm.API_PORT}/metrics', timeout=5).read().decode())"
        )
        out = self.lab.exec(host, [self.lab.python, "-c", code], timeout=20)
        assert out.returncode == 0, out.stderr
        return str(out.stdout)

    def upstream_gets(self) -> Counter[str]:
        """Digest -> GETs the upstream answered with content since the image was pushed."""
        assert self.registry_log is not None
        with self.registry_log.open("rb") as f:
            f.seek(self.log_mark)
            text = f.read().decode(errors="replace")
        return Counter(m.group(3) for m in ACCESS_RE.finditer(text))

    def link_tx(self) -> int:
        """Bytes the router has sent into site 2 (the site's downlink)."""
        return int(self.lm.iface_bytes(self.lab.router_ns, "s2", "tx_bytes"))

    def pull(self, host: Any, ref: str, containerd_name: str) -> Any:
        """A fresh containerd on `host` pulls `ref` through the host's meshd; returns it running."""
        c = self.lab.start_containerd(host, containerd_name)
        self.procs.append(c.proc)
        hosts_dir = c.hosts_dir(self.upstream, MIRROR)
        out = self.lab.exec(
            host,
            c.ctr_argv("image", "pull", "--hosts-dir", str(hosts_dir), "--snapshotter", "native", ref),
            timeout=PULL_TIMEOUT,
        )
        assert out.returncode == 0, f"{host.name}: ctr pull {ref}: {out.stdout}{out.stderr}"
        return c

    def check_content(self, c: Any, image: OciImage) -> None:
        """containerd's content store holds every blob of `image`, byte for byte."""
        for digest, data in image.blobs().items():
            got = subprocess.run(c.ctr_argv("content", "get", digest), capture_output=True, timeout=60)
            assert got.returncode == 0, got.stderr
            assert hashlib.sha256(got.stdout).hexdigest() == digest.removeprefix("sha256:")
            assert got.stdout == data, c.host.name

    def pull_through_everywhere(self) -> dict[str, Any]:
        """Phase (a): the first three client hosts pull the image by tag, one after the other."""
        before = self.link_tx()
        for h in self.clients[:3]:
            c = self.pull(h, f"{self.upstream}/{REPO}:{self.image.tag}", "containerd")
            self.check_content(c, self.image)
            self.lab.kill(c.proc)
        self.pulled_through = True
        return {"link_bytes": self.link_tx() - before, "gets": self.upstream_gets()}


def _skip_reason() -> str | None:
    missing = [t for t in TOOLS if shutil.which(t) is None and not Path(f"/usr/sbin/{t}").exists()]
    return f"missing {', '.join(missing)} (Debian packages: see .ci/run)" if missing else None


@pytest.fixture(scope="module")
def reg_lab(lab_module: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryLab]:
    ok, why = lab_module.available()
    if not ok:
        print(f"\nregistry lab test skipped: {why}", file=sys.stderr)
        pytest.skip(f"lab unavailable: {why}")
    missing = _skip_reason()
    if missing:
        print(f"\nregistry lab test skipped: {missing}", file=sys.stderr)
        pytest.skip(missing)
    lab = lab_module.Lab(PREFIX)
    lab.up(sites=2, hosts=4)
    try:
        lab._limit(lab.router_ns, "s2", SITE_RATE)  # into the site: what its hosts pull
        lab._limit(lab.switch_ns(2), "uplink", SITE_RATE)  # out of it
        from meshd.crypto import generate_publisher_keypair

        pub_key = lab.workdir / "publisher.key"
        generate_publisher_keypair(pub_key)
        image = make_image(seed=41, layer_sizes=(600_000, 1_500_000, 2_500_000), tag="v1")
        rl = RegistryLab(lab, lab_module, image, pub_key)
        proc, rl.registry_log = lab.start_docker_registry(rl.upstream_host, UPSTREAM_PORT)
        rl.procs.append(proc)
        layout = write_layout(lab.host_dir(rl.upstream_host) / "layout-v1", image)
        push = lab.exec(
            rl.upstream_host,
            ["skopeo", "copy", "--preserve-digests", "--dest-tls-verify=false", f"oci:{layout}:v1",
             f"docker://{rl.upstream}/{REPO}:v1"],
            timeout=120,
        )  # fmt: skip
        assert push.returncode == 0, push.stderr
        rl.log_mark = rl.registry_log.stat().st_size
        for h in rl.clients[:3]:
            rl.start_meshd(h)
        rl.wait_alive(rl.clients[:3])
        yield rl
    finally:
        lab.down()  # kills every lab process (meshd, containerd, docker-registry)


def test_a_site_pulls_each_blob_over_its_link_once(reg_lab: RegistryLab) -> None:
    rl = reg_lab
    got = rl.pull_through_everywhere()
    image = rl.image
    gets = got["gets"]
    # containerd resolves the tag at the upstream (no signed release covers it: the mirror says
    # 404 at once), then asks its mirror for everything by digest: one upstream GET per blob.
    for digest in image.blobs():
        assert gets[digest] == 1, (digest, gets)
    size = sum(len(b) for b in image.blobs().values())
    print(f"\n3 hosts pulled a {size} B image; the site's link carried {got['link_bytes'] / size:.2f}x")
    assert got["link_bytes"] <= 1.3 * size  # three direct pulls would be 3x
    upstream_bytes = sum(
        sample(rl.metrics(h), "meshd_registry_upstream_bytes_total") or 0 for h in rl.clients[:3]
    )
    assert upstream_bytes == size
    peer_in = sum(
        sample(rl.metrics(h), "meshd_registry_peer_bytes_total", direction="in") or 0 for h in rl.clients[:3]
    )
    # Three caches hold the image, one copy came from upstream: the other two over the LAN.
    assert peer_in >= 2 * size


def test_with_the_link_cut_a_new_host_pulls_from_its_neighbours(reg_lab: RegistryLab) -> None:
    rl = reg_lab
    if not rl.pulled_through:  # run alone
        rl.pull_through_everywhere()
    rl.lab.cut(2)
    gets_before = sum(rl.upstream_gets().values())
    newcomer = rl.clients[3]
    if newcomer.name not in rl.meshd:
        rl.start_meshd(newcomer)
    rl.wait_alive(rl.clients)
    n_blobs = len(rl.image.blobs())

    def sees_caches() -> bool:
        doc = rl.lab.api_get(newcomer, "/v1/images") or {}
        held = {c["node"]: c["blobs"] for c in doc.get("caches", [])}
        return all(held.get(h.name, 0) >= n_blobs for h in rl.clients[:3])

    rl.lm.wait_until(sees_caches, timeout=30, what="the newcomer sees its neighbours' caches")
    c = rl.pull(newcomer, f"{rl.upstream}/{REPO}@{rl.image.manifest_digest}", "containerd-cut")
    rl.check_content(c, rl.image)
    metrics = rl.metrics(newcomer)
    assert sample(metrics, "meshd_registry_upstream_bytes_total") == 0
    assert (sample(metrics, "meshd_registry_hits_total", kind="blob", source="peer") or 0) >= len(
        rl.image.layers
    )
    assert sum(rl.upstream_gets().values()) == gets_before


def test_a_published_image_reaches_the_site_and_pulls_by_tag_with_the_link_cut(
    reg_lab: RegistryLab,
) -> None:
    rl = reg_lab
    lab = rl.lab
    if 2 not in lab.cut_sites:
        lab.cut(2)
    for h in rl.clients:
        if h.name not in rl.meshd:
            rl.start_meshd(h)
    rl.wait_alive(rl.clients)
    image = make_image(seed=42, layer_sizes=(800_000, 2_000_000), tag="v2")
    publisher = rl.clients[0]
    layout = write_layout(lab.host_dir(publisher) / "layout-v2", image)
    out = lab.exec(
        publisher,
        [lab.python, "-m", "meshd.cli.meshctl", "publish-image", str(layout), "--name", "app-image",
         "--version", "2", "--repo", REPO, "--image-tag", "v2", "--key", str(rl.pub_key), "--json",
         "--token-file", str(lab.host_dir(publisher) / "meshd" / "api-token")],
        timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    rid = json.loads(out.stdout)["id"]

    def everywhere() -> bool:
        for h in rl.clients:
            doc = lab.api_get(h, "/v1/releases") or {}
            rows = doc.get("releases", [])
            if not any(r["id"] == rid and r["state"] in ("active", "installed") for r in rows):
                return False
        return True

    t0 = time.monotonic()
    rl.lm.wait_until(everywhere, timeout=120, what="the image release on every client host")
    took = time.monotonic() - t0
    print(f"\nthe image release was installed on {len(rl.clients)} hosts {took:.1f}s after publish")
    for h in rl.clients[1:3]:
        c = rl.pull(h, f"{rl.upstream}/{REPO}:v2", "containerd-release")
        rl.check_content(c, image)
        metrics = rl.metrics(h)
        assert (sample(metrics, "meshd_registry_hits_total", kind="manifest", source="release") or 0) >= 1
