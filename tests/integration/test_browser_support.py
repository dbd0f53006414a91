"""The support page in a real headless Chromium against a real collector: token handling and per-acquirer
access, the fleet list with filters and server-side paging, search by terminal and merchant, the diagnosis,
the 24-hour timeline and the unreconciled transactions. Screenshots of each view go to docs/screenshots/."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import BrowserContext, Page, Route, async_playwright, expect

from collector.sim.simulator import Simulator, make_fleet
from tests.harness.core import ROOT, Process, require_binary, wait_until
from tests.integration.test_support_stack import TOKENS, all_heard, get_json, start_stack

pytestmark = pytest.mark.integration

# The committed screenshots are refreshed only on request, so a test run leaves the working tree clean.
SHOTS = ROOT / "docs" / "screenshots" if os.environ.get("POSFLEET_UPDATE_SCREENSHOTS") == "1" else None
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
OFFLINE, BACKLOG, DROPS, HISTORY, RECON, HEALTHY = "T00000", "T00002", "T00004", "T00006", "T00010", "T00012"
OUTDATED = [f"T{n:05d}" for n in range(14, 70)]  # enough problem terminals for a second page


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[BrowserContext]:
    """Debian's Chromium, headless, through playwright (no downloaded browser)."""
    executable = require_binary("/usr/bin/chromium", "chromium")
    async with async_playwright() as p:
        context = await p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=executable, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1366, "height": 768},
        )
        try:
            yield context
        finally:
            await context.close()


async def set_token(page: Page, token: str | None) -> None:
    if await page.locator("#token-forget").is_visible():
        await page.click("#token-forget")
    if token:
        await page.fill("#token", token)
        await page.click("#token-save")
        await expect(page.locator("#token-state")).to_be_visible()


async def search(page: Page, text: str) -> None:
    await page.fill("#q", text)
    await page.click("#search-btn")


async def shot(page: Page, name: str, where: Path) -> None:
    where.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(where / name), full_page=True)
    assert (where / name).stat().st_size > 10_000, name  # a real page, not a blank one


async def test_support_page(tmp_path: Path, mosquitto: Process, browser: BrowserContext) -> None:
    specs = make_fleet(72, ("acq-a", "acq-b"))
    sim = Simulator(f"mqtt://127.0.0.1:{mosquitto.port}", specs, 0.5, receipts=True)
    a_tids = {s.tid for s in specs if s.acquirer == "acq-a"}
    # The terminals run before the collector starts and the test never blocks the simulator's loop: a terminal
    # heard late (72 clients connecting on a loaded machine) would really be "never seen" for a moment, and
    # HEALTHY's timeline below must stay empty. Silence counts after 6 intervals (3 s); the offline terminal is
    # still called within 2.5 s of its last will.
    async with sim:
        collector = await asyncio.to_thread(
            start_stack, tmp_path, mosquitto.port, sim, thresholds={"offline_factor": 6})
        port = collector.port
        url = f"http://127.0.0.1:{port}/support"
        try:
            await asyncio.to_thread(wait_until, lambda: all_heard(port, specs), 30, "every terminal heard")
            # The host drops two of RECON's transactions yet to come (one per interval), so the collector
            # sees both receipts.
            done = len(sim.completed[RECON])
            dropped = {f"{RECON}-{done + 2}", f"{RECON}-{done + 3}"}
            sim.drop_txn_ids = dropped
            sim.set_fault(HISTORY, "paper_out")  # raised, then cleared below: a closed interval in the timeline
            for tid, fault in ((OFFLINE, "network_loss"), (BACKLOG, "stuck_uploads"), (DROPS, "host_drops"),
                               (HISTORY, "outdated_app"), *((t, "outdated_app") for t in OUTDATED)):
                sim.set_fault(tid, fault)

            def conditions(tid: str) -> set[str]:
                return {c["condition"] for c in get_json(port, f"/api/v1/terminals/{tid}")["conditions"]}

            await asyncio.to_thread(wait_until, lambda: "hardware_fault" in conditions(HISTORY), 20, "paper out")
            sim.clear_fault(HISTORY, "paper_out")
            await asyncio.to_thread(
                wait_until,
                lambda: get_json(port, "/api/v1/terminals?limit=1")["total"] == 4 + len(OUTDATED)
                and conditions(HISTORY) == {"outdated_software"} and "upstream_missing" in conditions(DROPS)
                and {x["txn_id"] for x in get_json(port, f"/api/v1/reconcile?terminal_id={RECON}")[
                    "missing_at_acquirer"]} == dropped,
                40, "faults raised", 0.25)

            shots = SHOTS or tmp_path / "screenshots"
            page = await browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))

            # No token: the shell loads, the data does not.
            await page.goto(url)
            await expect(page.locator("#view-error")).to_contain_text("A valid API token is required")
            assert await page.locator("table").count() == 0
            await shot(page, "support-no-token.png", shots)

            # Acquirer B's token: A's terminal is not found, the list holds only B's terminals.
            await set_token(page, TOKENS["b"])
            await expect(page.locator("#fleet-table")).to_be_visible()
            rows = await page.locator("#fleet-table tbody tr").evaluate_all(
                "rows => rows.map(r => r.dataset.terminal)")
            assert rows and not set(rows) & a_tids
            await search(page, OFFLINE)
            await expect(page.locator("#notice")).to_contain_text(f'No terminal or merchant "{OFFLINE}" visible')
            await page.goto(f"{url}#/terminal/{OFFLINE}")
            await expect(page.locator("#view-error")).to_contain_text("Not found")
            await shot(page, "support-wrong-acquirer.png", shots)

            # Acquirer A's token: the fleet list, filters and paging.
            await page.goto(url)
            await set_token(page, TOKENS["all"])
            info = page.locator("#page-info")
            await expect(info).to_have_text(f"1–50 of {4 + len(OUTDATED)}")
            await shot(page, "support-fleet.png", shots)
            await page.click("#page-next")
            await expect(info).to_have_text(f"51–{4 + len(OUTDATED)} of {4 + len(OUTDATED)}")
            await expect(page.locator("#page-next")).to_be_disabled()
            await page.select_option("#f-condition", "offline")
            await expect(info).to_have_text("1–1 of 1")
            assert "condition=offline" in page.url
            await expect(page.locator("#fleet-table tbody tr")).to_have_count(1)
            await expect(page.locator(f'#fleet-table tr[data-terminal="{OFFLINE}"]')).to_be_visible()
            # Three filters changed faster than the list reloads (each answer held back 0.4 s, as on a busy
            # collector): every choice is kept, and no older answer replaces the newest.
            async def held_back(route: Route) -> None:
                await asyncio.sleep(0.4)
                await route.continue_()

            def is_list(u: str) -> bool:
                return "/api/v1/terminals?" in u

            await page.route(is_list, held_back)
            await page.select_option("#f-condition", "")
            await page.select_option("#f-acquirer", "acq-a")
            site = sorted({s.site for s in specs if s.acquirer == "acq-a"})[1]
            await page.select_option("#f-site", site)
            listed = await asyncio.to_thread(get_json, port, f"/api/v1/terminals?acquirer=acq-a&site={site}")
            expected = {t["terminal_id"] for t in listed["terminals"]}
            await expect(page).to_have_url(re.compile(rf"#/fleet\?acquirer=acq-a&site={re.escape(site)}$"))
            await expect(page.locator("#fleet-table tbody tr")).to_have_count(len(expected))
            await page.unroute(is_list, held_back)
            shown = await page.locator("#fleet-table tbody tr").evaluate_all(
                "rows => rows.map(r => r.dataset.terminal)")
            assert set(shown) == expected
            await shot(page, "support-fleet-filtered.png", shots)

            # Search a terminal: diagnosis, timeline, unreconciled transactions.
            await search(page, OFFLINE)
            await expect(page.locator("#diag-summary")).to_contain_text("Primary cause: offline")
            await expect(page.locator("#primary-cause")).to_contain_text("last will at")
            await expect(page.locator('#merchant-message p[lang="zh-CN"]')).to_contain_text(OFFLINE)
            await expect(page.locator('#checklist tr[data-step="network_power"]')).to_contain_text("problem")
            await expect(page.locator('#timeline .tl-row[data-condition="offline"] .tl-bar')).to_have_count(1)
            await shot(page, "support-terminal-offline.png", shots)

            await search(page, HISTORY)
            await expect(page.locator("#diag-summary")).to_contain_text("Primary cause: outdated software")
            bars = page.locator('#timeline .tl-row[data-condition="hardware_fault"] .tl-bar')
            await expect(bars).to_have_count(1)
            assert "now" not in (await bars.get_attribute("title") or "")  # the paper-out interval is closed
            outdated = page.locator('#timeline .tl-row[data-condition="outdated_software"] .tl-bar')
            await expect(outdated).to_have_count(1)
            await page.select_option("#tl-hours", "1")  # zoom in: the bars are minutes old
            await expect(page.locator("#timeline h3")).to_have_text(re.compile("Conditions, last 1 hour"))
            assert page.url.endswith(f"#/terminal/{HISTORY}?hours=1")
            width = await bars.evaluate("b => b.getBoundingClientRect().width")
            assert width > 1
            await shot(page, "support-terminal-timeline.png", shots)

            await search(page, RECON)
            await expect(page.locator("#diag-summary")).to_contain_text("Primary cause: unrecorded transactions")
            missing = page.locator("#unreconciled table.missing tbody tr td.mono")
            await expect(missing).to_have_count(len(dropped))
            assert set(await missing.all_inner_texts()) == dropped
            await shot(page, "support-terminal-unreconciled.png", shots)

            await search(page, HEALTHY)
            await expect(page.locator("#diag-summary")).to_contain_text("Nothing wrong found")
            await expect(page.locator("#diag-summary")).to_contain_text("transactions reaching the acquirer up to")
            await expect(page.locator("#timeline-empty")).to_be_visible()
            await shot(page, "support-terminal-healthy.png", shots)

            # Search a merchant: its terminals (both acquirers for read:*) and its reconciliation.
            merchant = next(s.mid for s in specs if s.tid == RECON)
            await search(page, merchant)
            await expect(page.locator("#merchant-title")).to_have_text(f"Merchant {merchant}")
            mine = {s.tid for s in specs if s.mid == merchant}
            await expect(page.locator("#merchant-terminals tbody tr")).to_have_count(len(mine))
            await expect(page.locator("#unreconciled table.missing tbody tr")).to_have_count(len(dropped))
            await shot(page, "support-merchant.png", shots)

            # The same merchant with acquirer B's token: only B's terminals, none of A's transactions.
            await set_token(page, TOKENS["b"])
            await expect(page.locator("#merchant-terminals tbody tr")).to_have_count(
                len({s.tid for s in specs if s.mid == merchant and s.acquirer == "acq-b"}))
            assert not await page.locator("#unreconciled table.missing").count()
            # The token lives in this tab's sessionStorage only.
            assert await page.evaluate("sessionStorage.getItem('posfleet.token')") == TOKENS["b"]
            assert await page.evaluate("localStorage.length") == 0
            assert errors == []
        finally:
            collector.stop()
    assert "Traceback" not in collector.log_text()
