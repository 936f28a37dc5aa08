"""Classification: unknown codes never lose the event; class/type overrides follow the catalogue."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from models.events import CrmEvent
from tasks.classify import ClassificationRequest, classify
from tasks.context import StageContext
from tasks.ingest.call import ingest_call
from tasks.ingest.visit import ingest_visit
from tasks.views import events_json
from tests.conftest import load_example


def call(call_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "schema": "crm.call/1",
        "source_system": "pbx-hki",
        "call_id": call_id,
        "status": "completed",
        "direction": "outbound",
        "from": "201",
        "to": "+358 44 765 4321",
        "agent": "anna",
        "started_at": "2026-11-25T13:02:00+02:00",
        "duration_s": 60,
        **fields,
    }


def stored_call(db: Session, ctx: StageContext, message: dict[str, Any]) -> dict[str, Any]:
    assert ingest_call(db, ctx, message).outcome == "stored"
    events = db.scalars(select(CrmEvent).where(CrmEvent.source_id == message["call_id"])).all()
    assert len(events) == 1
    return events_json(db, list(events))[0]


# -- unknown codes ------------------------------------------------------------------------------


def test_unknown_category_falls_back_to_the_default_and_is_noted(
    world: Session, ctx: StageContext
) -> None:
    event = stored_call(world, ctx, call("cl-1", category="no_such_category"))
    assert (event["category"], event["class"], event["type"]) == (
        "crm_event",
        "events",
        "crm_event",
    )
    assert "no_such_category" in event["classification_note"]
    assert "refused" in event["classification_note"]
    # The rest of the event is intact.
    assert event["contact"] == "Liisa Korhonen"
    assert event["seller"] == "anna"


def test_unknown_class_is_refused_and_noted(world: Session, ctx: StageContext) -> None:
    event = stored_call(world, ctx, call("cl-2", category="crm_event", **{"class": "no_class"}))
    assert (event["category"], event["class"]) == ("crm_event", "events")
    assert "no_class" in event["classification_note"]


def test_unknown_type_is_refused_and_noted(world: Session, ctx: StageContext) -> None:
    event = stored_call(world, ctx, call("cl-3", category="crm_event", type="no_type"))
    assert (event["category"], event["type"]) == ("crm_event", "crm_event")
    assert "no_type" in event["classification_note"]


def test_unknown_property_is_dropped_the_known_ones_kept(world: Session, ctx: StageContext) -> None:
    event = stored_call(
        world, ctx, call("cl-4", properties=["commercial", "no_property", "advisory"])
    )
    assert event["properties"] == ["advisory", "commercial"]
    assert "no_property" in event["classification_note"]


def test_unknown_codes_in_a_visit_never_lose_it(world: Session, ctx: StageContext) -> None:
    message = {
        **load_example("visits/visit-with-memo.json"),
        "category": "no_such_category",
        "class": "no_class",
        "type": "no_type",
        "properties": ["commercial", "no_property"],
    }
    result = ingest_visit(world, ctx, message)
    assert result.outcome == "stored"
    event = events_json(world, [world.get_one(CrmEvent, result.event_id)])[0]
    assert (event["category"], event["class"], event["type"]) == (
        "customer_visit",
        "sales",
        "customer_visit",
    )
    assert event["properties"] == ["commercial"]
    for code in ("no_such_category", "no_class", "no_type", "no_property"):
        assert code in event["classification_note"]


# -- class and type overrides --------------------------------------------------------------------


def test_class_override_accepted_where_the_category_allows_selection(
    world: Session, ctx: StageContext
) -> None:
    event = stored_call(world, ctx, call("cl-5", category="crm_event", **{"class": "sales"}))
    assert (event["category"], event["class"], event["type"]) == ("crm_event", "sales", "crm_event")
    assert "refused" not in event["classification_note"]


def test_type_override_accepted_where_the_category_allows_selection(
    world: Session, ctx: StageContext
) -> None:
    event = stored_call(world, ctx, call("cl-6", category="crm_event", type="lead"))
    assert (event["category"], event["class"], event["type"]) == ("crm_event", "events", "lead")


def test_class_override_refused_for_sales_action(world: Session, ctx: StageContext) -> None:
    event = stored_call(world, ctx, call("cl-7", category="sales_action", **{"class": "marketing"}))
    assert (event["category"], event["class"], event["type"]) == (
        "sales_action",
        "sales",
        "sales_action",
    )
    assert "marketing" in event["classification_note"]
    assert "refused" in event["classification_note"]


def test_type_override_refused_for_sales_action(world: Session, ctx: StageContext) -> None:
    event = stored_call(world, ctx, call("cl-8", category="sales_action", type="lead"))
    assert event["type"] == "sales_action"
    assert "lead" in event["classification_note"]


@pytest.mark.parametrize(
    ("category", "class_code", "expected_class", "refused"),
    [
        ("crm_event", "marketing", "marketing", False),
        ("crm_event", "events", "events", False),
        ("lead", "sales", "marketing", True),
        ("sales_action", "events", "sales", True),
        ("customer_visit", "marketing", "sales", True),
    ],
)
def test_classify_override_per_category(
    world: Session, category: str, class_code: str, expected_class: str, refused: bool
) -> None:
    result = classify(
        world,
        ClassificationRequest(source_kind="call", category=category, class_code=class_code),
    )
    assert result.category == category
    assert result.class_code == expected_class
    assert ("refused" in result.note) is refused


def test_the_message_category_wins_over_a_rule(world: Session) -> None:
    result = classify(
        world,
        ClassificationRequest(
            source_kind="email",
            category="sales_action",
            rule_category="customer_visit",
            rule_reason="recipient plus-address +visit",
        ),
    )
    assert result.category == "sales_action"


def test_source_defaults(world: Session) -> None:
    assert classify(world, ClassificationRequest(source_kind="call")).category == "crm_event"
    assert classify(world, ClassificationRequest(source_kind="email")).category == "crm_event"
    assert classify(world, ClassificationRequest(source_kind="visit")).category == "customer_visit"


def test_classification_note_says_why(world: Session, ctx: StageContext) -> None:
    event = stored_call(world, ctx, call("cl-9", category="sales_action"))
    assert "sales_action" in event["classification_note"]
    assert "message" in event["classification_note"]
