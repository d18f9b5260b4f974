"""Two sites of three gateways running `meshd run --profile local` in the lab.

The steps build on each other (module-scoped mesh), in file order:
each site finds itself by mDNS alone -> one --join seed merges the sites -> a cut link makes each
side see the other dead, and restoring it heals the mesh with no operator action -> a node killed
with -9 and restarted with neither mDNS nor seeds rejoins from its peer snapshot.
Every wait is bounded; timings are printed (measured properly in bench/), not asserted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pytest

CLUSTER = "lab-sites"
FORM_TIMEOUT = 45.0
DEAD_TIMEOUT = 60.0
HEAL_TIMEOUT = 90.0  # goal is 60 s after the link returns; the test allows some slack


def _daemon_ready(lab: Any, lm: ModuleType) -> str:
    """Empty when `meshd run` can be started here, else why not."""
    argv = lab.meshd_argv(lab.hosts()[0])
    proc = subprocess.run(
        [*argv[: argv.index("run") + 1], "--help"],
        capture_output=True,
        text=True,
        cwd=str(lm.REPO),
        env={**os.environ, "PYTHONPATH": str(lm.REPO)},
        timeout=30,
    )
    if proc.returncode != 0 or "--mdns-interface" not in proc.stdout:
        return f"`meshd run` is not usable yet: {(proc.stderr or proc.stdout).strip()[-300:]}"
    return ""


@dataclass
class Mesh:
    lab: Any
    lm: ModuleType
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    broken: str = ""

    def start(self, host: str, **kw: Any) -> None:
        self.procs[host] = self.lab.start_meshd(host, cluster=CLUSTER, **kw)

    def stop(self, host: str, sig: signal.Signals = signal.SIGTERM) -> None:
        proc = self.procs.pop(host)
        self.lab.kill(proc, sig)

    def views(self, hosts: list[str] | None = None) -> dict[str, dict[str, str] | None]:
        names = hosts or [h.name for h in self.lab.hosts()]
        with ThreadPoolExecutor(len(names)) as pool:
            return dict(zip(names, pool.map(self.lab.member_states, names), strict=True))

    def wait_views(self, check: Any, timeout: float, what: str) -> float:
        """Wait until check(views) is true; seconds it took."""
        t0 = time.monotonic()
        last: dict[str, Any] = {}

        def ok() -> bool:
            nonlocal last
            last = self.views()
            return bool(check(last))

        try:
            self.lm.wait_until(ok, timeout, interval=0.3, what=what)
        except TimeoutError:
            self.broken = what
            pytest.fail(f"{what}: not reached in {timeout:.0f}s; last views: {last}\n{self.logs()}")
        return time.monotonic() - t0

    def logs(self, tail: int = 1500) -> str:
        out = []
        for h in self.lab.hosts():
            path = self.lab.host_dir(h) / "meshd.log"
            if path.exists():
                out.append(f"--- {h.name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    def require(self) -> None:
        if self.broken:
            pytest.skip(f"an earlier step failed: {self.broken}")


def _site(name: str) -> str:
    return name[:2]  # s1h2 -> s1


def _alive(view: dict[str, str] | None) -> set[str]:
    return {n for n, s in (view or {}).items() if s == "alive"}


@pytest.fixture(scope="module")
def mesh(lab: Any, lab_module: ModuleType) -> Iterator[Mesh]:
    why = _daemon_ready(lab, lab_module)
    if why:
        pytest.skip(why)
    lab.kill_all()
    for site in list(lab.cut_sites):
        lab.restore(site)
    m = Mesh(lab, lab_module)
    try:
        yield m
    finally:
        lab.kill_all()
        for site in list(lab.cut_sites):
            lab.restore(site)


def test_each_site_finds_itself_by_mdns_alone(mesh: Mesh) -> None:
    names = [h.name for h in mesh.lab.hosts()]
    for name in names:
        mesh.start(name, fresh=True)  # mDNS on, no seeds

    def sites_complete(views: dict[str, dict[str, str] | None]) -> bool:
        return all(_alive(v) == {n for n in names if _site(n) == _site(h)} for h, v in views.items())

    took = mesh.wait_views(sites_complete, FORM_TIMEOUT, "each site complete by mDNS alone")
    print(f"\nsites complete by mDNS in {took:.1f}s (after processes started)")
    time.sleep(2.0)  # mDNS is link-local: still no member from the other site
    views = mesh.views()
    assert all(_site(m) == _site(h) for h, v in views.items() for m in (v or {})), views


def test_one_seed_merges_the_sites(mesh: Mesh) -> None:
    mesh.require()
    seed = mesh.lab.host("s2h1")
    mesh.stop("s1h1")  # graceful leave; it comes back with one seed in the other site
    mesh.start("s1h1", joins=[f"{seed.ip}:7788"])
    names = {h.name for h in mesh.lab.hosts()}
    took = mesh.wait_views(
        lambda views: all(_alive(v) == names for v in views.values()), FORM_TIMEOUT, "one mesh of 6"
    )
    print(f"\nsites merged through one seed in {took:.1f}s")


def test_cut_link_each_side_sees_other_dead_then_heals_by_itself(mesh: Mesh) -> None:
    mesh.require()
    names = {h.name for h in mesh.lab.hosts()}
    mesh.lab.cut(2)

    def split(views: dict[str, dict[str, str] | None]) -> bool:
        for host, view in views.items():
            if view is None:
                return False
            other = {n for n in names if _site(n) != _site(host)}
            own = names - other
            if _alive(view) != own or any(view.get(n) != "dead" for n in other):
                return False
        return True

    took = mesh.wait_views(split, DEAD_TIMEOUT, "each side sees the other dead")
    print(f"\nafter the cut, each side saw the other dead in {took:.1f}s")

    mesh.lab.restore(2)
    took = mesh.wait_views(
        lambda views: all(_alive(v) == names for v in views.values()), HEAL_TIMEOUT, "mesh healed"
    )
    print(f"link restored: whole mesh alive again in {took:.1f}s")


def test_kill9_node_rejoins_from_snapshot_without_mdns_or_seeds(mesh: Mesh) -> None:
    mesh.require()
    names = {h.name for h in mesh.lab.hosts()}
    victim = "s2h3"
    mesh.stop(victim, signal.SIGKILL)
    others = sorted(names - {victim})
    mesh.wait_views(
        lambda views: all(views[h] and views[h].get(victim) in ("suspect", "dead") for h in others),
        DEAD_TIMEOUT,
        f"the mesh to notice {victim} is gone",
    )
    log_path = mesh.lab.host_dir(victim) / "meshd.log"
    log_start = log_path.stat().st_size
    mesh.start(victim, mdns=False)  # same data dir: identity and peer snapshot; no seeds
    took = mesh.wait_views(
        lambda views: all(_alive(v) == names for v in views.values()),
        FORM_TIMEOUT,
        f"{victim} back in the mesh from its snapshot",
    )
    print(f"\n{victim} rejoined from its snapshot in {took:.1f}s")
    with log_path.open("rb") as f:
        f.seek(log_start)
        restarted_log = f.read().decode(errors="replace")
    assert "mDNS: advertising" not in restarted_log  # really without mDNS
