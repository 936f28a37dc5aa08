"""The events search takes the catalogue's names as people say them, and says when a filter
names nothing instead of finding nothing."""

from __future__ import annotations

import base64
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy.orm import Session

from tasks.context import StageContext
from tasks.errors import BadInput
from tasks.ingest.email import ingest_email
from tasks.ingest.visit import ingest_visit
from tasks.search import EventFilters, filters_from, search_events
from tasks.views import events_json
from tests.conftest import ROOT, load_example

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
        ({"source_kind": "bogus"}, "no kind of event 'bogus': it is one of call, email, visit"),
    ],
)
def test_a_filter_that_names_nothing_is_bad_input(
    world: Session, filters: dict[str, str], said: str
) -> None:
    with pytest.raises(BadInput) as raised:
        found(world, **filters)
    assert raised.value.reason.startswith(said)


@pytest.mark.parametrize("text", ["%", "!!!", "\\", "  "])
def test_a_text_search_with_no_word_in_it_is_bad_input(text: str) -> None:
    """It looked for nothing, and so found every event."""
    with pytest.raises(BadInput, match="has no word to look for"):
        filters_from({"text": text})


def test_source_is_the_sending_system_for_every_kind(world: Session, ctx: StageContext) -> None:
    """An email's source is the gateway that delivered it, as a call's is its PBX; the kind of
    event is --source-kind, and a kind given as a source says so."""
    raw = (ROOT / "examples" / "emails" / "bcc-offer-with-pdf.eml").read_bytes()
    email = {
        "schema": "crm.email/1",
        "source_system": "smtp-gw",
        "raw_b64": base64.b64encode(raw).decode(),
        "received_at": "2026-11-25T10:00:00+02:00",
    }
    stored = ingest_email(world, ctx, email)
    assert stored.outcome == "stored"
    visit = load_example("visits/visit-with-memo.json")
    ingest_visit(world, ctx, visit)

    page = search_events(world, EventFilters(source="smtp-gw"), HELSINKI, limit=100)
    assert [e.id for e in page.events] == [stored.event_id]
    assert events_json(world, page.events, HELSINKI)[0]["source"] == "smtp-gw"
    assert found(world, source=visit["source_system"]) == [visit["visit_id"]]
    assert found(world, source_kind="email", source="smtp-gw")
    with pytest.raises(BadInput) as raised:
        found(world, source="email")
    assert "--source-kind email" in raised.value.reason


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_a_finnish_word_finds_its_inflected_forms_and_the_compounds_it_is_in(
    database: str, request: pytest.FixtureRequest
) -> None:
    """The visit's subject is "Huoltosopimuksen uusiminen" (the renewal of the service
    contract), its memo speaks of "nykyisen sopimuksen vasteajat" and "tarjous"."""
    if database == "sqlite":
        world, ctx = request.getfixturevalue("sqlite_world")
    else:
        world, ctx = request.getfixturevalue("world"), request.getfixturevalue("ctx")
    visit = load_example("visits/visit-with-memo.json")
    ingest_visit(world, ctx, visit)
    mine = {"source": visit["source_system"]}
    for words in (
        "huoltosopimus",  # the nominative finds the genitive of the subject
        "Huoltosopimuksen",
        "huoltosopimuksia",
        "sopimus",  # a part of the compound, and the memo's "sopimuksen"
        "uusimisesta huoltosopimus",  # every word, in any form and order
        "tarjouksen",  # the memo's "tarjous"
        "vasteaika",
    ):
        assert found(world, **mine, text=words) == [visit["visit_id"]], words
    for words in ("vuosisopimus", "huoltosopimus hinnankorotus", "takuu"):
        assert found(world, **mine, text=words) == [], words
