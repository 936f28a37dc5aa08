"""Statistics by class (laji), type, category, property and seller; free-text search."""

from __future__ import annotations

from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy.orm import Session

from tasks.context import StageContext
from tasks.ingest.call import ingest_call
from tasks.ingest.visit import ingest_visit
from tasks.search import events_query, filters_from
from tasks.stats import statistics
from tests.messages import outbound_call

HELSINKI = ZoneInfo("Europe/Helsinki")


call = outbound_call


@pytest.fixture
def events(world: Session, ctx: StageContext) -> Session:
    for message in (
        call("s-1", "2026-11-23T09:00:00+02:00", note="Tarjous 50% alennuksella"),
        call("s-2", "2026-11-29T23:30:00+02:00", category="sales_action"),
        call("s-3", "2026-11-30T00:30:00+02:00", category="sales_action", agent="mikko"),
        call("s-4", "2026-11-29T22:30:00Z", category="lead", agent="mikko"),  # Monday, Helsinki
        call("s-5", "2026-10-30T09:00:00+02:00", properties=["advisory"]),
    ):
        assert ingest_call(world, ctx, message).outcome == "stored"
    visit = {
        "schema": "crm.visit/1",
        "source_system": "field-app",
        "visit_id": "s-visit",
        "seller": "anna",
        "customer_number": "10001",
        "started_at": "2026-11-24T10:00:00+02:00",
        "subject": "HUOLTOSOPIMUS ja vasteajat",
        "memo": "Asiakas toivoo nopeampaa VASTEAIKAA kriittisille laitteille.",
        "properties": ["commercial", "advisory"],
    }
    assert ingest_visit(world, ctx, visit).outcome == "stored"
    cancelled = {**visit, "visit_id": "s-cancelled", "cancelled": True}
    assert ingest_visit(world, ctx, cancelled).outcome == "stored"
    world.flush()
    return world


def counts(rows: list[dict[str, Any]], by: str) -> dict[str, int]:
    return {row[by]: row["events"] for row in rows}


def test_statistics_by_each_dimension(events: Session) -> None:
    def stats(by: str, period: str | None = None) -> dict[str, int]:
        return counts(statistics(events, by, period, HELSINKI), by)

    # Cancelled events are never counted.
    assert stats("class") == {"events": 2, "sales": 3, "marketing": 1}
    assert stats("category") == {"crm_event": 2, "sales_action": 2, "customer_visit": 1, "lead": 1}
    assert stats("type") == {"crm_event": 2, "sales_action": 2, "customer_visit": 1, "lead": 1}
    assert stats("property") == {"advisory": 2, "commercial": 1}
    assert stats("seller") == {"anna": 4, "mikko": 2}
    # Periods are read in the configured zone: Sunday 23:30 is W48, the UTC time is W49.
    assert stats("class", "2026-W48") == {"events": 1, "sales": 2}
    assert stats("class", "2026-W49") == {"sales": 1, "marketing": 1}
    assert stats("seller", "2026-10") == {"anna": 1}
    assert stats("category", "2026-11") == {
        "crm_event": 1,
        "sales_action": 2,
        "customer_visit": 1,
        "lead": 1,
    }


def test_statistics_rows_name_their_codes(events: Session) -> None:
    rows = statistics(events, "class", None, HELSINKI)
    assert rows[0] == {"class": "sales", "name": "Myynti", "name_en": "Sales", "events": 3}
    seller = statistics(events, "seller", None, HELSINKI)[0]
    assert (seller["seller"], seller["name"]) == ("anna", "Anna Lahtinen")


def search(session: Session, **filters: Any) -> list[str]:
    query = events_query(filters_from(filters), HELSINKI).limit(1000)
    return sorted(e.source_id for e in session.scalars(query))


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("huoltosopimus", ["s-cancelled", "s-visit"]),  # the subject, in any case
        ("vasteaikaa", ["s-cancelled", "s-visit"]),  # the memo
        ("50%", ["s-1"]),  # % is a character, not a wildcard
        ("5_%", []),
        ("ei löydy", []),
    ],
)
def test_free_text_search_over_subject_and_memo(
    events: Session, text: str, found: list[str]
) -> None:
    assert search(events, text=text) == found


def test_search_by_class_drives_the_listing(events: Session) -> None:
    assert search(events, class_="sales") == ["s-2", "s-3", "s-cancelled", "s-visit"]
    assert search(events, class_="sales", text="vasteaikaa", seller="anna") == [
        "s-cancelled",
        "s-visit",
    ]
