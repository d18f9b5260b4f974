"""The pure parts of bench/bench_registry.py (issue 13's benchmark): the image it writes is a valid
OCI layout of gzipped random layers, its result file gives median, spread, failures, the
clocks and the ratio to one host alone, and bench/report.py puts its headline first."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

from bench import report
from bench.bench_registry import CLOCKS, WAYS, render, summarize_runs, write_image

ENV = {
    "date": "d",
    "host": "h",
    "kernel": "k",
    "cpus": 2,
    "load_1m_at_start": 0.1,
    "python": "3.11",
    "command": "c",
}
SIZE = 200_000_000


def test_the_image_is_an_oci_layout_of_gzipped_random_layers(tmp_path: Path) -> None:
    image = write_image(tmp_path / "layout", 600_000, 3, seed=5)
    blobs = tmp_path / "layout" / "blobs" / "sha256"
    for path in blobs.iterdir():  # every blob is named by its digest
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name
    index = json.loads((tmp_path / "layout" / "index.json").read_text())
    assert index["manifests"][0]["digest"] == image.manifest_digest
    assert index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == "v1"
    manifest = json.loads((blobs / image.manifest_digest.removeprefix("sha256:")).read_bytes())
    layers = manifest["layers"]
    assert len(layers) == 3
    config = json.loads((blobs / manifest["config"]["digest"].removeprefix("sha256:")).read_bytes())
    contents = set()
    for d, diff_id in zip(layers, config["rootfs"]["diff_ids"], strict=True):
        assert d["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
        data = (blobs / d["digest"].removeprefix("sha256:")).read_bytes()
        assert len(data) == d["size"]
        tar_bytes = gzip.decompress(data)
        assert "sha256:" + hashlib.sha256(tar_bytes).hexdigest() == diff_id
        with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
            member = tar.getmembers()[0]
            f = tar.extractfile(member)
            assert f is not None
            contents.add(f.read())
    assert len(contents) == 3  # three different random files
    assert 600_000 * 0.97 <= image.size <= 600_000 * 1.03
    assert image.size == sum(p.stat().st_size for p in blobs.iterdir())


def _doc() -> dict[str, Any]:
    def runs(times: list[float | None], egress: float) -> list[dict[str, Any]]:
        return [
            {"error": "timed out"}
            if t is None
            else {"time_s": t, "egress_bytes": egress * SIZE, "cpu_s": 9.0, "ok": True}
            for t in times
        ]

    raw = {
        "alone": runs([18.0, 17.0, 19.0], 1.0),
        "direct": runs([140.0, 135.0, 150.0], 8.0),
        "pull": runs([24.0, None, 26.0], 1.05),
        "release": runs([40.0, 38.0, 45.0], 1.1),
    }
    return {
        "bench": "registry",
        "env": ENV,
        "conditions": {
            "hosts": 8,
            "rate": "100mbit",
            "image_bytes": SIZE,
            "layers": 5,
            "meshd_profile": "lan",
            "containerd": "1.6.20",
            "runs": 3,
            "clocks": dict(CLOCKS),
        },
        "runs": raw,
        "summary": {w: summarize_runs(raw[w], SIZE) for w in WAYS},
    }


def test_the_result_file_gives_medians_spread_failures_clocks_and_the_ratio_to_one_host() -> None:
    md = render(_doc())
    assert "| meshd pull-through (site cache) | 25.0 s (24.0 s-26.0 s), n=2, 1 failed | 1.05x" in md
    assert "| every host direct from the upstream | 140.0 s (135.0 s-150.0 s), n=3 | 8.00x" in md
    assert "failed run: timed out" in md
    for how in CLOCKS.values():
        assert how in md
    # 140 / 18, 25 / 18, 40 / 18
    assert "every host direct from the upstream 7.78x, meshd pull-through (site cache) 1.39x" in md
    assert "meshd-published image release 2.22x" in md
    # 8 pulls x 9 CPU s over 2 CPUs: 36 s, 2.00x the 18 s alone
    assert (
        "floor for 8 pulls at once, whatever the transport: 8 x one pull's CPU (9.00 s) over 2 CPUs = "
        "36.0 s (2.00x" in md
    )


def test_the_report_headline_names_every_way_against_the_goal(tmp_path: Path) -> None:
    (tmp_path / "registry.json").write_text(json.dumps(_doc()))
    (tmp_path / "registry.md").write_text(render(_doc()))
    text = report.render(tmp_path, plots=False)
    head = text.split("## Headlines", 1)[1].split("##", 1)[0]
    assert "**8 hosts behind 100mbit pull a 200 MB image**" in head
    assert "direct 140.0 s (135.0 s-150.0 s), n=3, egress 8.00x (8.00x-8.00x), 7.78x one host alone" in head
    assert (
        "pull-through 25.0 s (24.0 s-26.0 s), n=2, 1 failed, egress 1.05x (1.05x-1.05x), 1.39x one host"
        in head
    )
    assert "release 40.0 s" in head
    assert "Goal: egress ~1x, last host <= 1.5x one host alone" in head
    assert "# Container images to a site" in text  # the table, under "Every table"
