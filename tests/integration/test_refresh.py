"""Seller cards and tallies through the real worker: current within a second, counts = lists."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import select

from models.db import snapshot
from models.events import CrmEvent
from models.ledger import Delivery
from models.parties import Staff
from models.targets import RefreshRequest, Tally
from tasks.periods import period_keys
from tasks.views import seller_cards, zone_of
from tests.integration.conftest import LiveSystem
from workers.publish import Outcome

pytestmark = pytest.mark.integration

TEAM = [
    {"schema": "crm.party/1", "source_system": "erp", "kind": "staff", "username": "rf-boss",
     "name": "Riitta Esimies", "email": "rf-boss@myyntitalo.fi", "role": "manager"},
    {"schema": "crm.party/1", "source_system": "erp", "kind": "staff", "username": "rf-aino",
     "name": "Aino Myyjä", "email": "rf-aino@myyntitalo.fi", "role": "seller",
     "manager": "rf-boss", "extension": "301"},
    {"schema": "crm.party/1", "source_system": "erp", "kind": "staff", "username": "rf-eero",
     "name": "Eero Myyjä", "email": "rf-eero@myyntitalo.fi", "role": "seller",
     "manager": "rf-boss", "extension": "302"},
    {"schema": "crm.party/1", "source_system": "erp", "kind": "customer", "customer_number": "RF-1",
     "name": "Refresh Oy", "seller": "rf-aino"},
]  # fmt: skip


@pytest.fixture(scope="module")
def team(live: LiveSystem) -> LiveSystem:
    assert {d.outcome for d in live.publish("party", TEAM)} == {"done"}
    return live


@pytest.fixture
def notifications(redis_database: str) -> Iterator[Callable[[], list[str]]]:
    """The sellers whose ``crm.seller.<username>`` channel was notified so far."""
    client = redis.Redis.from_url(redis_database)
    subscriber = client.pubsub()
    subscriber.psubscribe("crm.seller.rf-*")
    subscriber.get_message(timeout=1)
    seen: list[str] = []

    def received() -> list[str]:
        while (message := subscriber.get_message(timeout=0.05)) is not None:
            if message["type"] == "pmessage":
                seen.append(json.loads(message["data"])["seller"])
        return seen

    yield received
    subscriber.close()
    client.close()


def a_moment_ago() -> str:
    return (datetime.now(UTC) - timedelta(seconds=5)).isoformat()


def stored_card(live: LiveSystem, username: str, category: str) -> dict[str, Any]:
    """The card as a screen reads it now."""
    with snapshot(live.sessions) as session:
        seller = session.scalar(select(Staff).where(Staff.username == username))
        assert seller is not None
        cards = seller_cards(session, seller, cards=live.settings.seller_cards)
    return next((card for card in cards if card["key"] == category), {})


def week_tally(live: LiveSystem, username: str, category: str) -> int:
    with live.sessions() as session:
        seller = session.scalar(select(Staff).where(Staff.username == username))
        assert seller is not None
        week, _ = period_keys(datetime.now(UTC), zone_of(seller))
        count = session.scalar(
            select(Tally.count).where(
                Tally.seller_id == seller.id, Tally.category_code == category, Tally.period == week
            )
        )
    return count or 0


def shown(live: LiveSystem, username: str, category: str) -> tuple[int, int, int]:
    """(the card's week count, how many of its listed events are this week's, the tally)."""
    card = stored_card(live, username, category)
    listed = sum(1 for e in card.get("events", []) if e["in_week"])
    return card.get("count_week", -1), listed, week_tally(live, username, category)


def fresh_within_a_second(
    live: LiveSystem, since: datetime, expected: dict[tuple[str, str], int]
) -> None:
    """Every (seller, category) card and tally shows its count within 1 s of ``since``."""
    deadline = since + timedelta(seconds=1)
    while True:
        actual = {key: shown(live, *key) for key in expected}
        if all(actual[key] == (n, n, n) for key, n in expected.items()):
            return
        assert datetime.now(UTC) < deadline, f"not refreshed within a second: {actual}"
        time.sleep(0.02)


def stored_at(delivery: Outcome) -> datetime:
    assert delivery.outcome == "stored", delivery.detail
    return delivery.finished_at


def test_moving_an_event_between_categories_and_sellers(
    team: LiveSystem, notifications: Callable[[], list[str]]
) -> None:
    visit = {
        "schema": "crm.visit/1",
        "source_system": "field-app",
        "visit_id": "rf-visit-1",
        "seller": "rf-aino",
        "customer_number": "RF-1",
        "started_at": a_moment_ago(),
        "subject": "Vuosisopimus",
    }
    (delivery,) = team.publish("visit", [visit])
    fresh_within_a_second(team, stored_at(delivery), {("rf-aino", "customer_visit"): 1})

    # Reclassified: from Asiakaskäynnit to Myyntitoimenpiteet.
    (delivery,) = team.publish("visit", [{**visit, "category": "sales_action"}])
    fresh_within_a_second(
        team,
        stored_at(delivery),
        {("rf-aino", "customer_visit"): 0, ("rf-aino", "sales_action"): 1},
    )
    # Reassigned: from rf-aino to rf-eero.
    moved = {**visit, "category": "sales_action", "seller": "rf-eero"}
    (delivery,) = team.publish("visit", [moved])
    fresh_within_a_second(
        team,
        stored_at(delivery),
        {("rf-aino", "sales_action"): 0, ("rf-eero", "sales_action"): 1},
    )
    assert stored_card(team, "rf-eero", "sales_action")["card"] == "Myyntitoimenpiteet"
    # Cancelled: off rf-eero's card and tally.
    (delivery,) = team.publish("visit", [{**moved, "cancelled": True}])
    fresh_within_a_second(team, stored_at(delivery), {("rf-eero", "sales_action"): 0})

    deadline = time.monotonic() + 2
    while {"rf-aino", "rf-eero"} - set(notifications()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert {"rf-aino", "rf-eero"} <= set(notifications())


def test_deleting_an_event_moves_its_count(team: LiveSystem) -> None:
    call = {
        "schema": "crm.call/1",
        "source_system": "pbx-rf",
        "call_id": "rf-call-1",
        "status": "completed",
        "direction": "outbound",
        "from": "301",
        "to": "+358 40 700 0001",
        "agent": "rf-aino",
        "started_at": a_moment_ago(),
    }
    before = shown(team, "rf-aino", "crm_event")[0]
    (delivery,) = team.publish("call", [call])
    fresh_within_a_second(team, stored_at(delivery), {("rf-aino", "crm_event"): max(before, 0) + 1})

    result = team.cli("delete-event", str(delivery.event_id), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["deleted"]["source_id"] == "rf-call-1"
    fresh_within_a_second(team, datetime.now(UTC), {("rf-aino", "crm_event"): max(before, 0)})
    with team.sessions() as session:
        assert session.get(CrmEvent, delivery.event_id) is None

    missing = team.cli("delete-event", str(delivery.event_id))
    assert missing.returncode == 1
    assert f"no event {delivery.event_id}" in missing.stderr


def test_targets_from_the_erp_through_the_worker(team: LiveSystem, tmp_path: Path) -> None:
    today = datetime.now(UTC).date().isoformat()
    messages = [
        {"schema": "crm.target/1", "source_system": "erp", "seller": "rf-aino",
         "category": "sales_action", "kind": "weekly", "value": 3, "valid_from": "2026-01-01"},
        {"schema": "crm.target/1", "source_system": "erp", "seller": "rf-aino",
         "category": "sales_action", "kind": "weekly", "value": 4, "valid_from": today},
        {"schema": "crm.target/1", "source_system": "erp", "seller": "rf-aino",
         "category": "crm_event", "kind": "weekly", "value": 3, "valid_from": today},
    ]  # fmt: skip
    path = tmp_path / "targets.json"
    path.write_text(json.dumps(messages), encoding="utf-8")
    result = team.cli("publish", "target", str(path), "--wait", "30", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["outcome"] for r in rows] == ["done", "done", "rejected"]
    assert "category crm_event does not take sales targets" in rows[2]["detail"]
    # The card shows the target in force this week (the later one) within a second.
    with team.sessions() as session:
        finished = max(
            d.finished_at
            for d in session.scalars(
                select(Delivery).where(Delivery.task_id.in_([r["task_id"] for r in rows]))
            )
        )
    deadline = finished + timedelta(seconds=1)
    while (stored_card(team, "rf-aino", "sales_action").get("target") or {}).get("weekly") != 4:
        assert datetime.now(UTC) < deadline, "the card's target was not refreshed within 1 s"
        time.sleep(0.02)

    history = team.cli("targets", "list", "--seller", "rf-aino", "--json")
    assert history.returncode == 0, history.stderr
    assert [(r["value"], r["valid_until"], r["source"]) for r in json.loads(history.stdout)] == [
        (3, today, "erp"),
        (4, None, "erp"),
    ]
    refused = team.cli("targets", "set", "rf-aino", "lead", "--weekly", "2")
    assert refused.returncode == 1
    assert "category lead does not take sales targets" in refused.stderr


def test_seller_view_command(team: LiveSystem) -> None:
    result = team.cli("seller-view", "rf-aino", "--json")
    assert result.returncode == 0, result.stderr
    cards = json.loads(result.stdout)
    assert [c["card"] for c in cards] == [
        "CRM-tapahtumat",
        "Liidit",
        "Myyntitoimenpiteet",
        "Asiakaskäynnit",
    ]
    for card in cards:
        assert {"card", "category", "count_week", "count_month", "events", "target"} <= set(card)
        assert card["count_week"] == sum(1 for e in card["events"] if e["in_week"])
        assert card["count_month"] == sum(1 for e in card["events"] if e["in_month"])
    text = team.cli("seller-view", "rf-aino")
    assert text.returncode == 0, text.stderr
    assert "Myyjän näkymä / seller view: Aino Myyjä (rf-aino)" in text.stdout
    assert "Myyntitoimenpiteet — viikko/week" in text.stdout
    assert "week target 0/4" in text.stdout


def test_statistics_command(team: LiveSystem) -> None:
    call = {
        "schema": "crm.call/1",
        "source_system": "pbx-rf",
        "call_id": "rf-call-stats",
        "status": "completed",
        "direction": "outbound",
        "from": "302",
        "to": "+358 40 700 0002",
        "agent": "rf-eero",
        "started_at": "2026-10-15T10:00:00+03:00",
        "category": "lead",
    }
    assert stored_at(team.publish("call", [call])[0])
    result = team.cli("stats", "--by", "seller", "--period", "2026-10", "--json")
    assert result.returncode == 0, result.stderr
    rows = {r["seller"]: r for r in json.loads(result.stdout)}
    assert (rows["rf-eero"]["name"], rows["rf-eero"]["events"]) == ("Eero Myyjä", 1)
    by_class = team.cli("stats", "--by", "class", "--period", "2026-10")
    assert by_class.returncode == 0, by_class.stderr
    assert "Markkinointi" in by_class.stdout
    bad = team.cli("stats", "--by", "class", "--period", "2026-13")
    assert bad.returncode == 2
    assert "not a period '2026-13'" in bad.stderr


def test_the_sweep_requests_a_refresh_that_was_never_sent(
    team: LiveSystem, notifications: Callable[[], list[str]]
) -> None:
    """As after a process died between claiming a seller's refresh and publishing it."""
    with team.sessions() as session, session.begin():
        eero = session.scalar(select(Staff.id).where(Staff.username == "rf-eero"))
        assert eero is not None
        session.merge(
            RefreshRequest(seller_id=eero, requested_at=datetime.now(UTC) - timedelta(minutes=2))
        )
    team.app.send_task("crm.refresh.sweep", queue="crm.refresh")
    deadline = time.monotonic() + 15
    while True:
        with team.sessions() as session:
            waiting = session.get(RefreshRequest, eero)
        if waiting is None and "rf-eero" in notifications():
            break
        assert time.monotonic() < deadline, f"not swept; worker log:\n{team.tail()}"
        time.sleep(0.1)


def test_after_all_of_it_no_drift_and_cards_equal_their_lists(team: LiveSystem) -> None:
    result = team.cli("reconcile", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["drift"] == 0
    text = team.cli("reconcile")
    assert text.returncode == 0 and "drift 0" in text.stdout
    with snapshot(team.sessions) as session:
        sellers = session.scalars(select(Staff).where(Staff.username.like("rf-%"))).all()
        cards = [
            card
            for moment in (datetime.now(UTC), datetime(2026, 10, 15, 12, tzinfo=UTC))
            for seller in sellers
            for card in seller_cards(session, seller, now=moment)
        ]
    assert any(card["events"] for card in cards)  # rf-eero's lead of October
    for card in cards:
        events = card["events"]
        assert not card["more"]
        assert card["count_week"] == sum(1 for e in events if e["in_week"])
        assert card["count_month"] == sum(1 for e in events if e["in_month"])
