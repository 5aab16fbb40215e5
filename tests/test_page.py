"""The fleet page in headless Chromium (Debian's, driven by Playwright)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from playwright.sync_api import Browser, Page, expect, sync_playwright

from dispatcher.keys import Keys

#: Flags for a headless Chromium on a machine with no network and no sandbox user.
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Chromium is needed: apt-get install chromium (scripts/test installs it)"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context()
    opened = context.new_page()
    yield opened
    context.close()


def test_the_page_shows_a_node_turn_ready_and_drains_it(system: Any, start_web: Any, page: Page,
                                                        live_nodes: Any, nodes: Any, r: redis.Redis) -> None:
    guarded = start_web(admin_token="pag3", **system.settings)
    page.goto(guarded.url + "/")
    expect(page.locator("h1")).to_have_text("GPU fleet")
    slow = nodes(guarded)
    slow.register(labels={"rack": "r7"})  # registering until it heartbeats
    row = page.locator(f'tr[data-node="{slow.node_id}"]')
    expect(row.locator("[data-status]")).to_have_text("registering", timeout=10_000)
    for _ in range(3):
        slow.heartbeat(cpu_percent=12.0)
    expect(row.locator("[data-status]")).to_have_text("ready", timeout=10_000)
    expect(row).to_contain_text("3 consecutive healthy heartbeats")
    expect(row).to_contain_text("rack=r7")
    expect(page.locator("#transitions")).to_contain_text("registering → ready")
    expect(row.locator("button")).to_have_count(0)  # no token given: no buttons

    page.fill("#token", "pag3")
    page.once("dialog", lambda dialog: dialog.accept("swap the fan"))
    row.locator("[data-action=drain]").click()
    expect(row.locator("[data-status]")).to_have_text("offline", timeout=10_000)
    expect(row).to_contain_text("drained: swap the fan (by the fleet page)")
    node = r.hgetall(Keys().node(slow.node_id))
    assert (node["drain_requested_by"], node["drain_reason"]) == ("the fleet page", "swap the fan")
    expect(row.locator("[data-action=undrain]")).to_be_visible()


def test_the_first_paint_needs_no_script_and_the_waiting_jobs_are_listed(system: Any, browser: Browser, client: Any,
                                                                         live_nodes: Any) -> None:
    node = live_nodes(system.web, {"m": "ready"}, labels={"paint": "1"}).wait_ready()
    waiting = client.send_task("dispatcher.submit_job", kwargs={"job_type": "asr", "required_models": ["nobody"]})
    context = browser.new_context(java_script_enabled=False)
    try:
        page = context.new_page()
        page.goto(system.web.url + "/")
        row = page.locator(f'tr[data-node="{node.node_id}"]')
        expect(row.locator("[data-status]")).to_have_text("ready")
        expect(row).to_contain_text("paint=1")
        assert row.locator(".id").first.evaluate("e => getComputedStyle(e).whiteSpace") == "nowrap"
        assert page.locator("#counts .pill").all_inner_texts() == ["registering", "ready", "degraded", "draining",
                                                                   "offline"]
        page.locator("#waiting").click()
        assert page.url.endswith("/jobs?state=waiting")
        expect(page.locator(f'tr[data-job="{waiting.id}"] [data-state]')).to_have_text("waiting")
    finally:
        context.close()
    client.send_task("dispatcher.cancel_job", kwargs={"job_id": waiting.id}).get(timeout=10)


def test_the_page_cordons_and_uncordons_a_node(system: Any, page: Page, live_nodes: Any, r: redis.Redis) -> None:
    node = live_nodes(system.web, {"m": "ready"}).wait_ready()
    page.goto(system.web.url + "/")
    row = page.locator(f'tr[data-node="{node.node_id}"]')
    page.once("dialog", lambda dialog: dialog.accept("bad fan"))
    row.locator("[data-action=cordon]").click()
    expect(row.locator("[data-cordoned]")).to_be_visible(timeout=10_000)
    expect(row.locator("[data-status]")).to_have_text("ready")
    expect(row).to_contain_text("no new jobs: cordoned by the fleet page")
    assert r.hget(Keys().node(node.node_id), "cordon_reason") == "bad fan"
    row.locator("[data-action=uncordon]").click()
    expect(row.locator("[data-cordoned]")).to_have_count(0, timeout=10_000)


def test_the_page_escapes_what_nodes_send(system: Any, page: Page, nodes: Any) -> None:
    sneaky = nodes(system.web)
    sneaky.register(installed_models=[{"model_id": "<img/src=x/onerror=alert(1)>", "status": "ready"}])
    page.goto(system.web.url + "/")
    row = page.locator(f'tr[data-node="{sneaky.node_id}"]')
    expect(row).to_contain_text("<img/src=x/onerror=alert(1)>")
    expect(row.locator("img")).to_have_count(0)


def test_the_page_shows_job_failures_and_a_running_jobs_mismatch(system: Any, client: Any, page: Page,
                                                                 live_nodes: Any, r: redis.Redis) -> None:
    node = live_nodes(system.web, {"m": "ready"}).wait_ready()
    result = client.send_task("dispatcher.submit_job", kwargs={"job_type": "asr", "max_attempts": 1})
    job = node.take_job(job_id=result.id)
    node.send({"type": "job_result", "job_id": job["job_id"], "attempt": 1, "success": False,
               "error": {"code": "OUT_OF_MEMORY", "message": "oom", "retryable": False, "node_fault": True}})
    node.usage["running_jobs"] = 3
    page.goto(system.web.url + "/")
    row = page.locator(f'tr[data-node="{node.node_id}"]')
    expect(row.locator("[data-job-failures]")).to_have_text("job failures: 1 of the last 1", timeout=10_000)
    expect(row.locator("[data-mismatch]")).to_have_text("node reports 3 running", timeout=10_000)
