"""Myyjän näkymä, the board, a customer's history and triage, as a seller and a manager see
them in Chromium: what they show, how they follow new events live, how they read on a phone and
with the keyboard alone."""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.request
import uuid
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, Response, expect

from tests.browser.conftest import ARTIFACTS, Screens

#: A token's streams at once (the service's default, CRM_HTTP_STREAMS_PER_TOKEN).
STREAMS_PER_TOKEN = 20

pytestmark = pytest.mark.integration


def signed_in(browser: Browser, screens: Screens, token: str, target: str, **options: Any) -> Page:
    """A new browser (its own cookies) signed in through the form, on ``target``."""
    context = browser.new_context(**options)
    page = context.new_page()
    page.goto(f"{screens.base}/login")
    page.fill("#token", token)
    page.click("button[type=submit]")
    page.goto(f"{screens.base}{target}")
    return page


def shot(page: Page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_signing_in_shows_the_sellers_cards_as_the_command_line_counts_them(
    browser: Browser, screens: Screens
) -> None:
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{screens.base}/sellers/anna")
    expect(page.locator("h1")).to_have_text("Kirjaudu sisään")  # the form, not the cards
    page.fill("#token", screens.tokens["anna-screen"])
    page.click("button[type=submit]")
    expect(page).to_have_url(f"{screens.base}/sellers/anna")
    shot(page, "seller-view")
    cards = screens.cli_json("seller-view", "anna")
    expect(page.locator("section.card")).to_have_count(len(cards))
    for card in cards:
        section = page.locator(f'section.card[data-card="{card["category"]}"]')
        expect(section.locator("h2")).to_have_text(card["card"])
        expect(section.locator(".count-week")).to_have_text(str(card["count_week"]))
        expect(section.locator(".count-month")).to_have_text(str(card["count_month"]))
        expect(section.locator("li.event")).to_have_count(len(card["events"]))
    # The sample targets (examples/targets.json): a weekly one on one card, a monthly on another.
    labels = {"week": "Viikkotavoite", "month": "Kuukausitavoite"}
    shown = 0
    for card in cards:
        target = card["target"]
        goals = [
            (labels[k], target[k]) for k in ("week", "month") if target and target[k]["target"]
        ]
        targets = page.locator(f'section.card[data-card="{card["category"]}"] .target')
        expect(targets).to_have_count(len(goals))
        for index, (label, goal) in enumerate(goals):
            expect(targets.nth(index)).to_contain_text(
                f"{label}: {goal['actual']} / {goal['target']}"
            )
        shown += len(goals)
    assert shown == 2
    context.close()


def post_visit(screens: Screens, subject: str, **fields: Any) -> None:
    visit = {
        "schema": "crm.visit/1",
        "source_system": "field-app",
        "visit_id": f"live-{uuid.uuid4().hex[:8]}",
        "seller": "anna",
        "customer_number": "10001",
        "started_at": datetime.now(UTC).replace(microsecond=0).isoformat(),
        "subject": subject,
        **fields,
    }
    request = urllib.request.Request(
        f"{screens.base}/v1/visits",
        data=json.dumps(visit).encode(),
        headers={
            "Authorization": f"Bearer {screens.tokens['field-app']}",
            "Content-Type": "application/json",
        },
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.status == 202


def test_a_visit_posted_through_the_api_appears_in_its_card_without_a_reload(
    browser: Browser, screens: Screens
) -> None:
    page = signed_in(browser, screens, screens.tokens["anna-screen"], "/sellers/anna")
    card = page.locator('section.card[data-card="customer_visit"]')
    before = int(card.locator(".count-week").inner_text())
    page.evaluate("window.__sameDocument = true")  # gone if the page were reloaded
    subject = f"Live-käynti {uuid.uuid4().hex[:6]}"
    post_visit(screens, subject, state="scheduled")  # booked, not yet done: "sovittu"
    expect(card.locator("li.event .subject", has_text=subject)).to_be_visible(timeout=30_000)
    expect(card.locator("li.event", has_text=subject).locator(".status")).to_have_text("sovittu")
    expect(card.locator(".count-week")).to_have_text(str(before + 1))
    assert page.evaluate("window.__sameDocument") is True
    expect(page.locator("#live-status")).to_contain_text("Päivitetty")
    shot(page, "seller-view-live")
    page.context.close()


def open_streams(screens: Screens, token: str, count: int) -> list[socket.socket]:
    """``count`` streams of the seller's view held open with ``token``, each past its ready."""
    held = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", screens.port), timeout=30)
        sock.sendall(
            b"GET /v1/stream/sellers/anna HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {token}\r\n\r\n".encode()
        )
        received = b""
        while b"event: ready" not in received:
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
        held.append(sock)
    return held


def test_a_screen_refused_its_stream_tries_again_and_goes_live(
    browser: Browser, screens: Screens
) -> None:
    """A token's streams all open (another tab, a script): the screen's own is refused (429),
    it says so, and tries again later; once a stream is free it follows changes again."""
    token = screens.cli_json(
        "token", "create", f"busy-{uuid.uuid4().hex[:6]}", "--scope", "read", "--staff", "anna"
    )["token"]
    held = open_streams(screens, token, STREAMS_PER_TOKEN)
    context = browser.new_context()
    page = context.new_page()
    page.clock.install()  # the page's timers, to be moved on rather than waited for
    page.goto(f"{screens.base}/login")
    page.fill("#token", token)
    page.click("button[type=submit]")

    def stream(response: Response) -> bool:
        return "/v1/stream/" in response.url

    with page.expect_response(stream) as first:
        page.goto(f"{screens.base}/sellers/anna")
    assert first.value.status == 429
    expect(page.locator("#live-status")).to_contain_text("Yhteys katkesi")
    for sock in held:
        sock.close()
    # The service lets a stream go once it sees its client gone: until then a retry may still
    # be refused, and the page tries again.
    deadline = time.monotonic() + 60
    while True:
        with page.expect_response(stream) as again:
            page.clock.run_for(31_000)  # the page's wait before trying again
        if again.value.status == 200:
            break
        assert again.value.status == 429
        assert time.monotonic() < deadline, "the screen never got its stream again"
    expect(page.locator("#live-status")).to_contain_text("Päivitetty")  # caught up on ready
    card = page.locator('section.card[data-card="customer_visit"]')
    subject = f"Takaisin-käynti {uuid.uuid4().hex[:6]}"
    post_visit(screens, subject)
    expect(card.locator("li.event .subject", has_text=subject)).to_be_visible(timeout=30_000)
    shot(page, "seller-view-stream-refused-then-live")
    context.close()


def last_month() -> str:
    today = date.today()
    return f"{today.year - 1}-12" if today.month == 1 else f"{today.year}-{today.month - 1:02d}"


def test_the_period_switcher_shows_the_week_and_month_chosen(
    browser: Browser, screens: Screens
) -> None:
    page = signed_in(browser, screens, screens.tokens["anna-screen"], "/sellers/anna")
    page.click("nav.periods >> text=Edellinen kuukausi")
    expect(page).to_have_url(f"{screens.base}/sellers/anna?period={last_month()}")
    expect(page.locator("nav.periods a[aria-current]")).to_contain_text("Edellinen kuukausi")
    page.fill("#period", "2026-W01")
    page.press("#period", "Enter")
    expect(page).to_have_url(f"{screens.base}/sellers/anna?period=2026-W01")
    expect(page.locator(".count-week").first).to_have_text("0")
    shot(page, "seller-view-period")
    page.context.close()


def test_the_board_shows_who_is_behind_and_who_is_on_track(
    browser: Browser, screens: Screens, tmp_path: Path
) -> None:
    # anna's sales call and visit of this week and month, whatever day the run falls on: the
    # demo's samples span several days, and in a week's or month's first days some of them
    # fall in the one before.
    now = datetime.now(UTC).replace(microsecond=0).isoformat()
    tag = uuid.uuid4().hex[:8]
    call = {
        "schema": "crm.call/1",
        "source_system": "pbx-hki",
        "call_id": f"board-{tag}",
        "status": "completed",
        "direction": "outbound",
        "from": "201",
        "to": "+358 44 765 4321",
        "agent": "anna",
        "started_at": now,
        "category": "sales_action",
    }
    visit = {
        "schema": "crm.visit/1",
        "source_system": "field-app",
        "visit_id": f"board-{tag}",
        "seller": "anna",
        "customer_number": "10001",
        "started_at": now,
        "subject": "Käynti tällä viikolla",
    }
    for kind, message in (("call", call), ("visit", visit)):
        path = tmp_path / f"{kind}.json"
        path.write_text(json.dumps([message]))
        done = screens.cli("publish", kind, str(path), "--wait", "60")
        assert done.returncode == 0, done.stdout + done.stderr
    first = date.today().replace(day=1).isoformat()
    for category, kind in (
        ("sales_action", "--weekly"),
        ("sales_action", "--monthly"),
        ("customer_visit", "--weekly"),
        ("customer_visit", "--monthly"),
    ):
        done = screens.cli("targets", "set", "anna", category, kind, "1", "--from", first)
        assert done.returncode == 0, done.stderr
    done = screens.cli("targets", "set", "mikko", "sales_action", "--weekly", "20", "--from", first)
    assert done.returncode == 0, done.stderr
    page = signed_in(browser, screens, screens.tokens["helena-board"], "/board")
    expect(page.locator("h1")).to_contain_text("Helena Salo")
    anna = page.locator('tr[data-seller="anna"]')
    mikko = page.locator('tr[data-seller="mikko"]')
    expect(mikko.first.locator(".flag")).to_have_text("jäljessä")
    expect(anna.first.locator(".flag")).to_have_count(0)
    expect(anna.locator("td.goal.on-track")).to_have_count(4)
    expect(mikko.locator("td.goal.behind").first).to_contain_text("jäljessä")
    expect(page.locator("svg.spark")).to_have_count(4)
    shot(page, "board")
    page.click("text=Mikko Nieminen")
    expect(page).to_have_url(f"{screens.base}/sellers/mikko")
    page.context.close()


def test_a_customers_history_and_linking_in_triage(browser: Browser, screens: Screens) -> None:
    page = signed_in(browser, screens, screens.tokens["anna-screen"], "/customers/10001")
    expect(page.locator("h1")).to_contain_text("Pohjolan Kone Oy")
    expect(page.locator("ol.history li.event").first).to_be_visible()
    shot(page, "customer")
    page.goto(f"{screens.base}/triage")
    rows = page.locator("ol.events > li.event")
    count = rows.count()
    assert count > 0
    shot(page, "triage")
    # Linking by hand (the admin scope): the event leaves the list.
    ambiguous = page.locator("li.event", has_text="monitulkintainen").first
    ambiguous.locator("input[name=customer]").fill("10002")
    ambiguous.locator("button[type=submit]").click()
    expect(page.locator("p.ok")).to_contain_text("kohdistettu")
    expect(page.locator("ol.events > li.event")).to_have_count(count - 1)
    page.context.close()


def test_the_seller_view_with_the_keyboard_alone(browser: Browser, screens: Screens) -> None:
    page = signed_in(browser, screens, screens.tokens["anna-screen"], "/sellers/anna")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Siirry sisältöön"
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "main"
    for _ in range(12):  # on to the period links
        page.keyboard.press("Tab")
        if "Edellinen viikko" in page.evaluate("document.activeElement.textContent"):
            break
    assert "Edellinen viikko" in page.evaluate("document.activeElement.textContent")
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline != "none"  # where the focus is can be seen
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(r"/sellers/anna\?period=\d{4}-W\d{2}$"))
    expect(page.locator("nav.periods a[aria-current]")).to_contain_text("Edellinen viikko")
    page.context.close()


def test_the_seller_view_on_a_phone(browser: Browser, screens: Screens) -> None:
    page = signed_in(
        browser,
        screens,
        screens.tokens["anna-screen"],
        "/sellers/anna?lang=en",
        viewport={"width": 375, "height": 740},
        is_mobile=True,
        has_touch=True,
    )
    expect(page.locator("h1")).to_contain_text("Seller view")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    widths = page.evaluate(
        "[...document.querySelectorAll('section.card')].map(c => c.getBoundingClientRect().width)"
    )
    assert widths and all(width <= 375 for width in widths)
    shot(page, "seller-view-phone")
    page.goto(f"{screens.base}/board")  # the language is remembered
    expect(page.locator("h1")).to_contain_text("Board")
    page.context.close()


def test_the_seller_s_overdue_tasks_are_shown_above_the_cards(
    browser: Browser, screens: Screens
) -> None:
    event = screens.cli_json("events", "--seller", "anna")[0]["id"]
    overdue = (date.today().toordinal() - 2, "Soita Matille takaisin")
    due = date.fromordinal(overdue[0]).isoformat()
    added = screens.cli("task", "add", str(event), "--title", overdue[1], "--due", due)
    assert added.returncode == 0, added.stderr
    page = signed_in(browser, screens, screens.tokens["anna-screen"], "/sellers/anna")
    task = page.locator("section.tasks li.task", has_text=overdue[1])
    expect(task).to_be_visible()
    expect(task).to_have_class(re.compile(r"\boverdue\b"))
    expect(task.locator(".due")).to_contain_text("myöhässä")
    shot(page, "seller-view-tasks")
    page.context.close()
