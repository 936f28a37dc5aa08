"""The seller view (Myyjän näkymä): configurable cards whose counts agree with their lists."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from models.events import CrmEvent, FollowUp
from models.parties import Staff
from models.targets import SellerView, Tally
from tasks.context import StageContext
from tasks.errors import BadInput
from tasks.ingest.call import ingest_call
from tasks.ingest.visit import ingest_visit
from tasks.maintenance import delete_event, reconcile
from tasks.refresh import refresh_seller
from tasks.targets import set_target
from tasks.views import CARD_EVENTS, seller_cards
from tests.messages import outbound_call

HELSINKI = ZoneInfo("Europe/Helsinki")


call = outbound_call


def visit(visit_id: str, started_at: str, seller: str = "anna", **fields: Any) -> dict[str, Any]:
    return {
        "schema": "crm.visit/1",
        "source_system": "field-app",
        "visit_id": visit_id,
        "seller": seller,
        "customer_number": "10001",
        "started_at": started_at,
        "subject": "Asiakaskäynti",
        **fields,
    }


def staff(db: Session, username: str) -> Staff:
    found = db.scalar(select(Staff).where(Staff.username == username))
    assert found is not None
    return found


def assert_counts_equal_lists(cards: list[dict[str, Any]]) -> None:
    for card in cards:
        assert card["count_week"] == sum(1 for e in card["events"] if e["in_week"]), card
        assert card["count_month"] == sum(1 for e in card["events"] if e["in_month"]), card
        assert all(e["in_week"] or e["in_month"] for e in card["events"])


def by_category(cards: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {card["category"]: card for card in cards}


def tally(db: Session, seller: Staff, category: str, period: str) -> int:
    return (
        db.scalar(
            select(Tally.count).where(
                Tally.seller_id == seller.id,
                Tally.category_code == category,
                Tally.period == period,
            )
        )
        or 0
    )


def test_default_cards_are_one_per_category_named_by_type(world: Session) -> None:
    cards = seller_cards(world, staff(world, "anna"), now=datetime(2026, 11, 26, tzinfo=HELSINKI))
    assert [(c["card"], c["card_en"], c["category"]) for c in cards] == [
        ("CRM-tapahtumat", "CRM events", "crm_event"),
        ("Liidit", "Leads", "lead"),
        ("Myyntitoimenpiteet", "Sales actions", "sales_action"),
        ("Asiakaskäynnit", "Customer visits", "customer_visit"),
    ]
    assert [c["target"] is not None for c in cards] == [False, False, True, True]


def test_cards_are_configurable(world: Session) -> None:
    configured = (("sales_action", "Myynti"), ("customer_visit", ""), ("no_such", "X"))
    cards = seller_cards(
        world, staff(world, "anna"), now=datetime(2026, 11, 26, tzinfo=HELSINKI), cards=configured
    )
    assert [(c["card"], c["category"]) for c in cards] == [
        ("Myynti", "sales_action"),
        ("Asiakaskäynnit", "customer_visit"),
    ]


def test_monday_card_after_sunday_night_and_a_utc_time(world: Session, ctx: StageContext) -> None:
    for message in (
        call("w-sun", "2026-11-29T23:30:00+02:00"),
        call("w-mon", "2026-11-30T00:30:00+02:00"),
        call("w-utc", "2026-11-29T22:45:00Z"),  # Monday 00:45 in Helsinki
    ):
        ingest_call(world, ctx, message)
    monday = datetime(2026, 11, 30, 12, 0, tzinfo=HELSINKI)
    card = by_category(seller_cards(world, staff(world, "anna"), now=monday))["crm_event"]
    assert (card["week"], card["month"]) == ("2026-W49", "2026-11")
    listed = {e["occurred_at"][:16]: (e["in_week"], e["in_month"]) for e in card["events"]}
    assert listed == {
        "2026-11-29T23:30": (False, True),
        "2026-11-30T00:30": (True, True),
        "2026-11-30T00:45": (True, True),
    }
    assert (card["count_week"], card["count_month"]) == (2, 3)


def test_week_53_card_spans_two_years(world: Session, ctx: StageContext) -> None:
    for message in (
        call("y-1", "2026-12-28T09:00:00+02:00"),
        call("y-2", "2026-12-31T23:30:00+02:00"),
        call("y-3", "2027-01-01T00:30:00+02:00"),
        call("y-4", "2027-01-04T09:00:00+02:00"),  # 2027-W01, January
    ):
        ingest_call(world, ctx, message)
    saturday = datetime(2027, 1, 2, 12, 0, tzinfo=HELSINKI)
    card = by_category(seller_cards(world, staff(world, "anna"), now=saturday))["crm_event"]
    assert (card["week"], card["month"]) == ("2026-W53", "2027-01")
    # Week 53: 28-31 December and 1 January; January: the 1st and the 4th.
    assert (card["count_week"], card["count_month"]) == (3, 2)
    assert_counts_equal_lists([card])
    next_week = datetime(2027, 1, 5, 12, 0, tzinfo=HELSINKI)
    card = by_category(seller_cards(world, staff(world, "anna"), now=next_week))["crm_event"]
    assert (card["week"], card["count_week"], card["count_month"]) == ("2027-W01", 1, 2)


def test_card_shows_target_progress_and_open_follow_ups(world: Session, ctx: StageContext) -> None:
    anna = staff(world, "anna")
    set_target(world, "anna", "sales_action", "weekly", 4, date(2026, 11, 2))
    set_target(world, "anna", "sales_action", "monthly", 10, date(2026, 11, 1))
    ingest_call(world, ctx, call("p-1", "2026-11-23T09:00:00+02:00", category="sales_action"))
    ingest_call(world, ctx, call("p-2", "2026-11-24T09:00:00+02:00", category="sales_action"))
    event = world.scalar(select(CrmEvent).where(CrmEvent.source_id == "p-2"))
    assert event is not None
    world.add(FollowUp(event_id=event.id, seller_id=anna.id, reason="Soita takaisin"))
    world.flush()
    # Thursday noon: 3.5 of 7 days gone, 2 of 4 expected by now: on track.
    thursday = datetime(2026, 11, 26, 12, 0, tzinfo=HELSINKI)
    card = by_category(seller_cards(world, anna, now=thursday))["sales_action"]
    assert card["target"]["week"] == {
        "period": "2026-W48",
        "target": 4,
        "actual": 2,
        "expected_by_now": 2.0,
        "pace": "on track",
    }
    month = card["target"]["month"]
    assert (month["target"], month["actual"], month["expected_by_now"], month["pace"]) == (
        10,
        2,
        8.5,
        "behind",
    )
    assert card["follow_ups"] == [
        {"event_id": event.id, "reason": "Soita takaisin", "subject": event.subject}
    ]


def test_refresh_tells_the_current_counts(world: Session, ctx: StageContext) -> None:
    anna = staff(world, "anna")
    ingest_call(world, ctx, call("s-1", "2026-11-24T09:00:00+02:00"))
    notification = refresh_seller(world, ctx, anna.id, now=datetime(2026, 11, 26, tzinfo=HELSINKI))
    assert notification is not None
    assert notification["tallies"] == {"crm_event/2026-W48": 1, "crm_event/2026-11": 1}
    view = world.get(SellerView, anna.id)
    assert view is not None and view.refreshed_at.isoformat() == notification["refreshed_at"]


def test_a_card_lists_the_latest_events_and_counts_them_all(
    world: Session, ctx: StageContext
) -> None:
    """A busy month: the card counts every event and lists the latest ones."""
    for i in range(CARD_EVENTS + 5):
        ingest_call(
            world, ctx, call(f"busy-{i}", f"2026-11-{2 + i % 28:02d}T09:{i % 60:02d}:00+02:00")
        )
    card = by_category(
        seller_cards(world, staff(world, "anna"), now=datetime(2026, 11, 26, tzinfo=HELSINKI))
    )["crm_event"]
    assert card["count_month"] == CARD_EVENTS + 5
    assert len(card["events"]) == CARD_EVENTS and card["more"]
    listed = [e["occurred_at"] for e in card["events"]]
    assert listed == sorted(listed, reverse=True)
    newest = max(
        world.scalars(select(CrmEvent.occurred_at).where(CrmEvent.source_id.like("busy-%")))
    )
    assert datetime.fromisoformat(listed[0]) == newest


def test_moves_cancellation_and_deletion_move_counts(world: Session, ctx: StageContext) -> None:
    anna, mikko = staff(world, "anna"), staff(world, "mikko")
    now = datetime(2026, 11, 26, 12, 0, tzinfo=HELSINKI)

    deliveries = iter(range(1000))

    def deliver(message: dict[str, Any]) -> None:
        delivery = StageContext(ctx.settings, task_id=f"delivery-{next(deliveries)}")
        assert ingest_visit(world, delivery, message).outcome == "stored"
        for seller_id in (anna.id, mikko.id):
            refresh_seller(world, ctx, seller_id)

    def counts() -> dict[tuple[str, str], tuple[int, int, int]]:
        """(seller, category) -> (card this week, its list length, the week's tally)."""
        result = {}
        for seller in (anna, mikko):
            for card in seller_cards(world, seller, now=now):
                if card["category"] in ("customer_visit", "sales_action"):
                    result[(seller.username, card["category"])] = (
                        card["count_week"],
                        len(card["events"]),
                        tally(world, seller, card["category"], "2026-W48"),
                    )
        return result

    first = visit("mv-1", "2026-11-24T10:00:00+02:00")
    deliver(first)
    assert counts()[("anna", "customer_visit")] == (1, 1, 1)
    # Reclassified: the count moves to the other category's card and tally.
    deliver({**first, "category": "sales_action"})
    assert counts()[("anna", "customer_visit")] == (0, 0, 0)
    assert counts()[("anna", "sales_action")] == (1, 1, 1)
    # Reassigned: from anna to mikko.
    deliver(
        {
            **first,
            "category": "sales_action",
            "seller": "mikko",
        }
    )
    assert counts()[("anna", "sales_action")] == (0, 0, 0)
    assert counts()[("mikko", "sales_action")] == (1, 1, 1)
    # Cancelled: off mikko's card and tally.
    deliver(
        {
            **first,
            "category": "sales_action",
            "seller": "mikko",
            "cancelled": True,
        }
    )
    assert counts()[("mikko", "sales_action")] == (0, 0, 0)
    # Deleted: another visit goes, and its count with it.
    deliver(visit("mv-2", "2026-11-25T10:00:00+02:00"))
    assert counts()[("anna", "customer_visit")] == (1, 1, 1)
    event = world.scalar(select(CrmEvent).where(CrmEvent.source_id == "mv-2"))
    assert event is not None
    summary, sellers = delete_event(world, event.id)
    assert summary["source_id"] == "mv-2" and sellers == {anna.id}
    refresh_seller(world, ctx, anna.id)
    assert counts()[("anna", "customer_visit")] == (0, 0, 0)
    assert world.get(CrmEvent, event.id) is None
    # After all of it the tallies have not drifted, and every card agrees with its list.
    assert reconcile(world, ctx).drift == 0
    for seller in (anna, mikko):
        assert_counts_equal_lists(seller_cards(world, seller, now=now))


def test_deleting_a_missing_event_is_an_error(world: Session) -> None:
    with pytest.raises(BadInput) as caught:
        delete_event(world, 987654321)
    assert caught.value.reason == "no event 987654321"


def test_a_class_card_lists_the_events_of_its_class(world: Session, ctx: StageContext) -> None:
    """``class:sales``: the seed lets the class shape the cards; a card of the sales class lists
    sales actions and customer visits together, with no target of its own."""
    ingest_call(world, ctx, call("c-1", "2026-11-24T09:00:00+02:00", category="sales_action"))
    ingest_visit(world, ctx, visit("c-2", "2026-11-25T10:00:00+02:00"))
    ingest_call(world, ctx, call("c-3", "2026-11-25T11:00:00+02:00"))  # crm_event: class events
    configured = (("class:sales", ""), ("class:events", "Muut"), ("class:nope", ""))
    cards = seller_cards(
        world, staff(world, "anna"), now=datetime(2026, 11, 26, tzinfo=HELSINKI), cards=configured
    )
    assert [(c["card"], c["card_en"], c["key"], c["class"], c["category"]) for c in cards] == [
        ("Myynti", "Sales", "class:sales", "sales", None),
        ("Muut", "Muut", "class:events", "events", None),
    ]
    sales = cards[0]
    assert {e["category"] for e in sales["events"]} == {"sales_action", "customer_visit"}
    assert (sales["count_week"], sales["target"], sales["follow_ups"]) == (2, None, [])
    assert cards[1]["count_week"] == 1
    assert_counts_equal_lists(cards)


def test_two_cards_of_one_type_are_titled_by_their_categories(world: Session) -> None:
    """Titles by type would be ambiguous where two chosen categories share a type."""
    from models.catalogue import Category

    lead = world.get(Category, "lead")
    assert lead is not None
    lead.default_type = "sales_action"
    world.flush()
    cards = seller_cards(world, staff(world, "anna"), now=datetime(2026, 11, 26, tzinfo=HELSINKI))
    titles = [c["card"] for c in cards]
    assert len(set(titles)) == len(titles), titles
    assert titles[:2] == ["CRM-tapahtumat", lead.name_fi]


def test_the_cards_setting_reads_categories_and_classes() -> None:
    from config.settings import ConfigError, load_settings

    settings = load_settings(
        {"CRM_SELLER_CARDS": "sales_action, customer_visit=Käynnit, class:sales=Kaikki"}
    )
    assert settings.seller_cards == (
        ("sales_action", ""),
        ("customer_visit", "Käynnit"),
        ("class:sales", "Kaikki"),
    )
    for wrong in ("class:", "type:sales", "class:a:b", "=Title"):
        with pytest.raises(ConfigError, match="CRM_SELLER_CARDS"):
            load_settings({"CRM_SELLER_CARDS": wrong})
