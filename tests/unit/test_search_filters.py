"""The events search takes the catalogue's names as people say them, and says when a filter
names nothing instead of finding nothing."""

from __future__ import annotations

from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy.orm import Session

from tasks.context import StageContext
from tasks.errors import BadInput
from tasks.ingest.visit import ingest_visit
from tasks.search import EventFilters, search_events
from tests.conftest import load_example

HELSINKI = ZoneInfo("Europe/Helsinki")


def found(db: Session, **filters: Any) -> list[str]:
    page = search_events(db, EventFilters(**filters), HELSINKI, limit=100)
    return [e.source_id for e in page.events]


def test_classes_types_and_categories_by_code_or_finnish_or_english_name(
    world: Session, ctx: StageContext
) -> None:
    visit = load_example("visits/visit-with-memo.json")
    ingest_visit(world, ctx, visit)
    mine = {"source": visit["source_system"]}
    for filters in (
        {"class_": "sales"},
        {"class_": "Myynti"},
        {"class_": "myynti"},
        {"class_": "Sales"},
        {"type": "Asiakaskäynnit"},
        {"category": "Asiakaskäynti"},
        {"category": "customer visit"},
    ):
        assert found(world, **mine, **filters) == [visit["visit_id"]], filters
    assert found(world, **mine, class_="Tapahtumat") == []


@pytest.mark.parametrize(
    ("filters", "said"),
    [
        ({"class_": "bogus"}, "no class 'bogus': the class is one of events (Tapahtumat)"),
        ({"property": "urgent"}, "no property 'urgent': the property is one of "),
        ({"seller": "nobody"}, "no staff member with the username 'nobody'"),
        ({"customer": "99999"}, "no customer with the number '99999'"),
    ],
)
def test_a_filter_that_names_nothing_is_bad_input(
    world: Session, filters: dict[str, str], said: str
) -> None:
    with pytest.raises(BadInput) as raised:
        found(world, **filters)
    assert raised.value.reason.startswith(said)
