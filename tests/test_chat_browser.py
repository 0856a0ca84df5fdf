"""The chat page in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright; no browser download):
type a request, see cards, refine ("cheaper"), see the prices drop, click a card, see the event stored."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.api_server import serve_in_thread

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason="Debian's chromium is not installed (make sysdeps)"),
]


def drive(base_url: str, turns: list[str], screenshot: Path | None = None, timeout_ms: int = 60_000) -> dict:
    """The shopper's session in the page: `turns` typed in order (the second must be "cheaper"), then a "why
    this?" and a click on the first card of the "cheaper" answer. Returns what the shopper saw."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        dialogs: list[str] = []  # a script injected through catalog text would open one
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(base_url + "/chat")
        prices, kinds = [], []
        for n, text in enumerate(turns, start=1):
            page.fill("#message", text)
            page.click("#ask button")
            page.wait_for_selector(f".msg.bot.answer:nth-of-type({2 * n}).done", timeout=timeout_ms)
            answer = page.locator(".msg.bot.answer").nth(n - 1)
            shown = answer.locator(".card").evaluate_all("cs => cs.map(c => c.dataset.price)")
            prices.append([float(p) for p in shown if p])
            kinds.append(answer.get_attribute("data-kind"))
        cheaper = page.locator(".msg.bot.answer").nth(1)
        cheaper.locator(".card .why-btn").first.click()
        reason_visible = cheaper.locator(".card.why .reason").first.is_visible()
        cheaper.locator(".card").first.click()
        page.wait_for_function("document.getElementById('status').textContent.includes('stored')", timeout=timeout_ms)
        status = page.text_content("#status") or ""
        state = page.input_value("#state")
        if screenshot is not None:
            page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    return {
        "prices": prices,
        "kinds": kinds,
        "status": status,
        "reason_visible": reason_visible,
        "dialogs": dialogs,
        "state": state,
    }


TURNS = ["{first}", "cheaper", "not that brand", "more like the second one"]


def test_shopper_session_in_chromium(tmp_path_factory, small_shop):
    from shoprec.api import create_app
    from shoprec.config import Settings
    from shoprec.service import Shoprec

    home = tmp_path_factory.mktemp("browserhome")
    settings = Settings(home=home, llm_backend="fake", sasrec_epochs=1, fit_fusion=False, allow_anonymous_local=True)
    core = Shoprec(settings)
    # a title with markup: the page must show it as text, never run it
    items = [small_shop.items[0].model_copy(update={"title": "<img src=x onerror=alert(1)> Evil Lamp"})]
    core.store.ingest([*items, *small_shop.items[1:]], small_shop.interactions)
    core.build_index(log=lambda _m: None)
    base, server = serve_in_thread(create_app(settings))  # create_app includes the chat router
    try:
        dept = small_shop.items[0].category[0]
        seen = drive(base, [t.format(first=f"{dept} under 1000") for t in TURNS])
    finally:
        server.should_exit = True  # type: ignore[attr-defined]
    first, cheaper = seen["prices"][:2]
    assert first and cheaper and max(cheaper) < max(first)
    assert seen["kinds"][:2] == ["picks", "picks"] and len(seen["kinds"]) == 4
    state = json.loads(seen["state"])  # the state panel after the 4th turn
    assert state["turns"] == 4 and state["excluded_brands"]
    assert "stored" in seen["status"] and seen["reason_visible"] and seen["dialogs"] == []
    rec_id = seen["status"].split("recommendation ")[1].rstrip(")")
    stored = core.store.events_for_recommendations([rec_id])
    assert len(stored) == 1 and stored[0].type.value == "view"
