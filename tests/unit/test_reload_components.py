"""The components' reconfigure() on a reload: health checks and handlers, trusted publisher keys,
tags and rate caps. No processes, sockets or sleeps (checks are in-process disk checks with a
stand-in statvfs; releases come from a stand-in peer)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from meshd.health.checks import CheckResult
from meshd.health.monitor import HealthMonitor
from meshd.health.spec import CheckSpec, HandlerSpec
from meshd.release.store import ChunkStore
from tests.unit.test_release_service import (
    EVIL,
    StoreBackedFetcher,
    announcing,
    make_release,
    make_service,
    settle,
)

HOUR = 3600.0  # no check runs again on its own during a test


def check(name: str, threshold: float = 0.0) -> CheckSpec:
    return CheckSpec(name, "disk", interval=HOUR, path="/", warning=threshold, critical=threshold)


class Statvfs:
    """Stands in for the disk check: passing unless the threshold is 100; counts runs by name."""

    def __init__(self) -> None:
        self.runs: dict[str, int] = {}

    def __call__(self, spec: CheckSpec) -> CheckResult:
        self.runs[spec.name] = self.runs.get(spec.name, 0) + 1
        return CheckResult("critical" if spec.warning == 100.0 else "passing", f"run {self.runs[spec.name]}")


async def test_reconfigured_checks_keep_what_did_not_change_and_stop_what_went() -> None:
    statvfs = Statvfs()
    summaries: list[str] = []
    times = iter(range(1, 100))
    monitor = HealthMonitor(
        [check("kept"), check("changed"), check("removed")],
        {"old": HandlerSpec("old", "true")},
        on_change=summaries.append,
        clock=lambda: float(next(times)),
        disk_check=statvfs,
    )
    await monitor.start()
    try:
        before = {c["name"]: c for c in monitor.checks()}
        tasks = {name: state.task for name, state in monitor._states.items()}
        assert summaries == ["passing"]

        await monitor.reconfigure(
            [check("kept"), check("changed", 100.0), check("added")], {"new": HandlerSpec("new", "true")}
        )
        after = {c["name"]: c for c in monitor.checks()}
        assert set(after) == {"kept", "changed", "added"}
        assert after["kept"] == before["kept"]  # same state, not run again
        assert monitor._states["kept"].task is tasks["kept"]  # same schedule
        assert statvfs.runs == {"kept": 1, "changed": 2, "removed": 1, "added": 1}
        assert after["changed"]["status"] == "critical"
        assert after["added"]["status"] == "passing"  # ran before it counted: never "not run yet"
        await asyncio.sleep(0)  # the cancelled task ends
        removed = tasks["removed"]
        assert removed is not None
        assert removed.cancelled()
        assert summaries == ["passing", "critical"]  # the new summary is published
        assert set(monitor.handlers) == {"new"}
        answer = await monitor.answer("old", b"", node="n1", site="s1")
        assert b"no handler" in answer
    finally:
        await monitor.stop()


async def test_reconfigure_before_start_only_swaps_the_specs() -> None:
    statvfs = Statvfs()
    monitor = HealthMonitor([check("a")], disk_check=statvfs)
    await monitor.reconfigure([check("b")], {})
    assert [c["name"] for c in monitor.checks()] == ["b"]
    assert statvfs.runs == {}


async def test_a_key_taken_off_the_trust_list_refuses_new_releases_and_keeps_the_installed(
    tmp_path: Path,
) -> None:
    peer_store = ChunkStore(tmp_path / "peer", fsync=False)
    v1 = make_release(tmp_path, "1.0", store=peer_store)
    v2 = make_release(tmp_path, "2.0", store=peer_store, seed=2, created=1_700_000_100.0)
    svc = make_service(tmp_path / "me")
    fake = StoreBackedFetcher(peer_store, {v1.release_id: v1.to_bytes(), v2.release_id: v2.to_bytes()})
    svc.fetcher = svc.driver.client = svc.intake.client = fake  # type: ignore[assignment]
    await svc.start()
    try:
        svc.member_update(announcing("p", v1))
        await settle(svc)
        assert [(r["version"], r["current"]) for r in svc.releases()] == [("1.0", True)]

        svc.reconfigure(trusted=[EVIL.public_key], tags={"role": "edge"}, upload_rate=1e6, download_rate=2e6)
        svc.member_update(announcing("q", v2))
        await settle(svc)
        rows = {r["version"]: r for r in svc.releases()}
        assert rows["1.0"]["current"]
        assert rows["1.0"]["state"] == "active"
        assert "2.0" not in rows  # signed by a key no longer trusted: refused, not fetched
        assert svc.tags == svc.policy.tags == {"role": "edge"}
        assert svc.server.upload_bucket.rate == 1e6
        assert svc.server.slots is not None  # a paced node queues uploads
        assert svc.driver.swarm_config.rate_limit == 2e6
        assert (svc.config.upload_rate, svc.config.download_rate) == (1e6, 2e6)

        svc.reconfigure(trusted=[EVIL.public_key], tags={}, upload_rate=None, download_rate=None)
        assert svc.server.upload_bucket.rate is None
        assert svc.server.slots is None
        assert svc.driver.swarm_config.rate_limit is None
    finally:
        await svc.stop()
