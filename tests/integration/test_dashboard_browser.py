"""The dashboard (GET /) in a real browser: Debian's chromium driven by Playwright, against three
real `meshd run` processes on 127.0.0.1 in two sites.

The page loads with no console error and no failed request, a published release reaches 100%
on it in every site, and a node killed with SIGKILL turns dead on it. A screenshot is kept in
$MESHD_TEST_ARTIFACTS (default tests/artifacts/).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import ConsoleMessage, Page, Request, Response, expect, sync_playwright

from tests.processes import Mesh, NodeProc

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
# Loopback only: nothing that would reach out to Google's hosts, no GPU, no sandbox (CI is root).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(os.environ.get("MESHD_TEST_ARTIFACTS") or Path(__file__).parents[1] / "artifacts")
SETTLE_MS = 60_000  # generous: two cores shared with other suites


STATS_SCRIPT = """() => {
  const members = {alive: 3, suspect: 0, dead: 0, left: 0};
  const at = (t, k) => ({t, gossip_in_bytes: 1000 * k, gossip_out_bytes: 800 * k,
    transfer_sent_bytes: 5000 * k, transfer_received_bytes: 7000 * k, transfer_origin_bytes: 0,
    probe_rtt_ms: 0.4 + k / 10, members});
  for (let k = 0; k < 5; k++) onStats(at(1e9 + 2 * k, k * k));
  // Read back in the same task: no real stats event can come in between.
  const count = (id) => document.querySelectorAll(`#${id} polyline`).length;
  return {gossip: count("chart-gossip"), transfer: count("chart-transfer"), rtt: count("chart-rtt"),
          caption: document.querySelector("#chart-gossip figcaption").textContent};
}"""


def _chromium() -> str | None:
    return CHROMIUM if os.access(CHROMIUM, os.X_OK) else shutil.which("chromium")


@pytest.fixture
def browser_page() -> Iterator[tuple[Page, list[str]]]:
    """A fresh headless chromium page, and the problems it reported (console errors, page
    errors, failed requests, HTTP errors)."""
    exe = _chromium()
    if exe is None:
        print("SKIP: Debian's chromium is not installed (apt-get install chromium)")
        pytest.skip("chromium is not installed")
    os.environ["PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD"] = "1"  # never fetch a browser of its own
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="meshd-chromium-") as profile, sync_playwright() as pw:
        # A fresh profile each run (Playwright passes it as --user-data-dir).
        context = pw.chromium.launch_persistent_context(
            profile,
            executable_path=exe,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1280, "height": 1000},
        )
        try:
            page = context.pages[0] if context.pages else context.new_page()

            def on_console(msg: ConsoleMessage) -> None:
                if msg.type == "error":
                    problems.append(f"console error: {msg.text}")

            def on_failed(req: Request) -> None:
                problems.append(f"request failed: {req.method} {req.url}: {req.failure}")

            def on_response(resp: Response) -> None:
                if resp.status >= 400:
                    problems.append(f"HTTP {resp.status}: {resp.request.method} {resp.url}")

            page.on("console", on_console)
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            page.on("requestfailed", on_failed)
            page.on("response", on_response)
            yield page, problems
        finally:
            context.close()


def _start_mesh(mesh: Mesh, pub_key: Path) -> list[NodeProc]:
    trust = ["--trust-publisher", f"{pub_key}.pub"]
    sites = ["north", "north", "south"]
    nodes = [mesh.node(f"gw{i}") for i in range(3)]
    nodes[0].start(extra=[*trust, "--site", sites[0]])
    for n, site in zip(nodes[1:], sites[1:], strict=True):
        n.start(join=[nodes[0].addr], extra=[*trust, "--site", site])
    mesh.wait_until(
        "3 alive members",
        lambda: all(sum(1 for s in n.states().values() if s == "alive") == 3 for n in nodes),
    )
    return nodes


@pytest.mark.timeout(150)
def test_dashboard_in_chromium(mesh: Mesh, tmp_path: Path, browser_page: tuple[Page, list[str]]) -> None:
    page, problems = browser_page
    pub_key = tmp_path / "publisher.key"
    mesh.run_meshd("keygen", "publisher", "--out", str(pub_key), check=True)
    gw0, gw1, gw2 = _start_mesh(mesh, pub_key)

    page.goto(gw0.api_url + "/")
    expect(page.locator("#conn")).to_have_text("live", timeout=SETTLE_MS)
    for name in ("gw0", "gw1", "gw2"):
        expect(page.locator(f'tr[data-member="{name}"]')).to_have_attribute(
            "data-state", "alive", timeout=SETTLE_MS
        )
    expect(page.locator('.card[data-site="north"]')).to_contain_text("2 alive")
    expect(page.locator('.card[data-site="south"]')).to_contain_text("1 alive")

    # The charts draw rates from the `stats` events' cumulative counters (fed here by hand: the
    # page's own handler, with the payload the daemon publishes every 2 s).
    if not page.locator("#chart-gossip polyline").count():  # until the daemon sends stats
        expect(page.locator("#chart-gossip .empty")).to_have_text("no data yet")
    drawn = page.evaluate(STATS_SCRIPT)
    assert (drawn["gossip"], drawn["transfer"], drawn["rtt"]) == (2, 3, 1), drawn
    # The last step: (16 - 9) * 1000 bytes in over 2 s.
    assert "in 3.5 KB/s" in drawn["caption"], drawn

    # A release published at gw0 reaches every node: 100% on the page, in both sites.
    src = tmp_path / "src" / "app.bin"
    src.parent.mkdir()
    src.write_bytes(os.urandom(300_000))
    out = gw0.meshctl(
        "publish", str(src), "--name", "app", "--version", "1.0", "--key", str(pub_key), token=True
    )
    assert out.returncode == 0, out.stderr
    release = page.locator('.release[data-release="app 1.0"]')
    expect(release).to_have_attribute("data-percent", "100.0", timeout=SETTLE_MS)
    expect(release).to_contain_text("3/3 nodes complete", timeout=SETTLE_MS)
    for site in ("north", "south"):
        expect(release.locator(f'.siterow[data-site="{site}"] .pct')).to_have_text("100.0%")
    expect(page.locator("#events li[data-kind='release']").first).to_be_visible(timeout=SETTLE_MS)

    # A member's checks, on a click (GET /v1/health?node=...).
    page.locator('tr[data-member="gw1"]').click()
    expect(page.locator("tr.details .check").first).to_be_visible(timeout=SETTLE_MS)

    # SIGKILL gw2: dead on the page; the rollout still reads 100% (a dead node is listed, not
    # counted).
    gw2.signal(signal.SIGKILL)
    gw2.wait_exit()
    expect(page.locator('tr[data-member="gw2"]')).to_have_attribute("data-state", "dead", timeout=SETTLE_MS)
    expect(page.locator('.card[data-site="south"]')).to_contain_text("1 dead", timeout=SETTLE_MS)
    expect(release.locator('.siterow[data-site="south"]')).to_contain_text("down: gw2", timeout=SETTLE_MS)
    expect(release).to_have_attribute("data-percent", "100.0")

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"dashboard screenshot: {shot}")
    assert shot.stat().st_size > 10_000
    assert problems == [], "\n".join(problems)
    assert gw1.running
