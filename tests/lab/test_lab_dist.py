"""Two sites of three gateways joined by a thin (tc tbf) site link: a release published at site 1
reaches site 2 mostly over site 2's own LAN, with about one copy crossing the link.

Uses its own lab (prefix `mdd-`, so the session lab of the other lab tests is left alone) and
measures the link with the router's interface counters (bytes the router sent into site 2).
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

PREFIX = "mdd-"
SITE_RATE = "24mbit"
SIZE = 12 * 1024 * 1024
CLUSTER = "lab-dist"


@pytest.fixture(scope="module")
def dist_lab(lab_module: ModuleType) -> Iterator[Any]:
    ok, why = lab_module.available()
    if not ok:
        pytest.skip(f"lab unavailable: {why}")
    lab = lab_module.Lab(PREFIX)
    lab.up(sites=2, hosts=3, site_rate=SITE_RATE)
    try:
        yield lab
    finally:
        lab.down()


def _rows(lab: Any, host: Any) -> list[dict[str, Any]]:
    doc = lab.api_get(host, "/v1/releases")
    return list(doc.get("releases", [])) if isinstance(doc, dict) else []


@pytest.mark.timeout(240)
def test_far_site_gets_the_release_over_its_lan(dist_lab: Any, lab_module: ModuleType) -> None:
    lab = dist_lab
    pub_key = lab.workdir / "publisher.key"
    if not pub_key.exists():
        from meshd.crypto import generate_publisher_keypair

        generate_publisher_keypair(pub_key)
    hosts = lab.hosts()
    seed = f"{hosts[0].ip}:{lab_module.MESHD_PORT}"
    procs = []
    try:
        for h in hosts:
            joins = [] if h is hosts[0] else [seed]
            procs.append(
                lab.start_meshd(
                    h,
                    cluster=CLUSTER,
                    mdns=False,
                    joins=joins,
                    fresh=True,
                    extra=["--trust-publisher", f"{pub_key}.pub"],
                )
            )
        deadline = time.monotonic() + 60
        while True:
            views = [lab.member_states(h) or {} for h in hosts]
            if all(sum(1 for s in v.values() if s == "alive") == len(hosts) for v in views):
                break
            assert time.monotonic() < deadline, f"mesh did not form: {views}"
            time.sleep(0.5)

        blob = random.Random(7).randbytes(SIZE)
        src = lab.host_dir(hosts[0]) / "release.bin"
        src.write_bytes(blob)
        want = hashlib.sha256(blob).hexdigest()
        router, link = lab.router_ns, "s2"
        before = lab_module.iface_bytes(router, link, "tx_bytes")
        t0 = time.monotonic()
        out = lab.exec(
            hosts[0],
            [
                lab.python,
                "-m",
                "meshd.cli.meshctl",
                "publish",
                str(src),
                "--name",
                "fw",
                "--version",
                "1",
                "--key",
                str(pub_key),
                "--json",
                "--token-file",
                str(lab.host_dir(hosts[0]) / "meshd" / "api-token"),
            ],
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        published = json.loads(out.stdout)
        stored = int(published["stored_bytes"])

        def active(h: Any) -> bool:
            return any(r["id"] == published["id"] and r["state"] == "active" for r in _rows(lab, h))

        deadline = time.monotonic() + 150
        while not all(active(h) for h in hosts):
            assert time.monotonic() < deadline, "release did not reach every host"
            time.sleep(1.0)
        took = time.monotonic() - t0
        crossed = lab_module.iface_bytes(router, link, "tx_bytes") - before
        for h in hosts:
            path = lab.host_dir(h) / "meshd" / "releases" / "fw" / "current" / "release.bin"
            assert hashlib.sha256(path.read_bytes()).hexdigest() == want, h.name
        far = [h for h in hosts if h.site == 2]
        via_lan = via_wan = 0
        for h in far:
            metrics = lab.exec(
                h,
                [
                    lab.python,
                    "-c",
                    "import urllib.request;print(urllib.request.urlopen("
                    f"'http://127.0.0.1:{lab_module.API_PORT}/metrics').read().decode())",
                ],
            )
            for line in metrics.stdout.splitlines():
                if line.startswith("meshd_dist_fetch_bytes_same_site_total"):
                    via_lan += int(float(line.split()[-1]))
                elif line.startswith("meshd_dist_fetch_bytes_other_site_total"):
                    via_wan += int(float(line.split()[-1]))
        print(
            f"\n{SIZE} B release ({stored} B stored) to 6 hosts in {took:.1f}s; site link "
            f"carried {crossed / stored:.2f} copies; far hosts got {via_wan / stored:.2f} copies "
            f"over the link and {via_lan / stored:.2f} over their LAN"
        )
        # About one copy over the link (gossip, bitmaps and HTTP framing ride along).
        assert crossed <= 1.6 * stored
        assert via_lan >= 1.5 * stored
        assert via_wan <= 1.3 * stored
    finally:
        for p in procs:
            lab.kill(p)
