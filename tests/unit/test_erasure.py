"""The patterns an erasure searches with find every form a person's data arrives in, and only
that; the embedded database (SQLite) is searched as thoroughly as PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from tasks.context import StageContext
from tasks.erasure import Person, erase, find_person, patterns, scrub_text, scrub_value
from tasks.ingest.call import ingest_call
from tests.conftest import load_example

MATTI = Person("contact", names=["Matti Virtanen"], emails=["matti.virtanen@pohjolankone.fi"])
NUMBER = Person("number", phones=["+358401234567"])


@pytest.mark.parametrize(
    "written",
    [
        "+358 40 123 4567",
        "+358401234567",
        "+358 (0)40 123 4567",
        "00358 40 1234567",
        "358401234567",
        "040 123 4567",
        "040-123 4567",
        "040.123.45.67",
        "0401234567",
        "(0)40 123 4567",
    ],
)
def test_a_number_is_found_in_every_form_it_is_written(written: str) -> None:
    assert scrub_text(f"soita {written}, kiitos", patterns(NUMBER)) == (
        "soita [erased number], kiitos"
    )


@pytest.mark.parametrize("other", ["0401234568", "04012345671", "+358 40 123 45", "123 4567"])
def test_another_number_is_left_alone(other: str) -> None:
    assert scrub_text(f"soita {other}", patterns(NUMBER)) == f"soita {other}"


def test_a_name_and_an_address_in_any_case_and_order() -> None:
    found = patterns(MATTI)
    assert scrub_text("MATTI  VIRTANEN <Matti.Virtanen@Pohjolankone.fi>", found) == (
        "[erased name] <[erased address]>"
    )
    assert scrub_text("Virtanen, Matti kävi", found) == "[erased name] kävi"
    assert scrub_text("Matti Virtasen kanssa", found) == "Matti Virtasen kanssa"
    assert scrub_value(
        {"to": ["matti.virtanen@pohjolankone.fi"], "matti.virtanen@pohjolankone.fi": 1}, found
    ) == {"to": ["[erased address]"], "[erased address]": 1}


def test_the_embedded_database_is_searched_too(
    sqlite_world: tuple[Session, StageContext],
) -> None:
    session, ctx = sqlite_world
    for message in load_example("calls/inbound-answered.json"):
        ingest_call(session, ctx, message)
    person = find_person(session, ctx.settings, "contact", ["10001", "matti  virtanen"])
    report = erase(session, ctx.settings, person, by="test")
    assert report.counts["contact"] == 1 and report.counts["crm_event"] >= 1
    dump = "\n".join(session.connection().connection.iterdump())
    for form in ("Matti Virtanen", "matti.virtanen@", "040 123 4567", "+358401234567"):
        assert form.lower() not in dump.lower(), form
    assert session.execute(text("SELECT count(*) FROM crm_event")).scalar_one() == 1


def test_an_erased_address_leaves_its_contact_and_the_staff_s_numbers(
    sqlite_world: tuple[Session, StageContext],
) -> None:
    """erase address takes the address (and the contact's key made of it), not the contact's
    name; erase number never takes a staff member's number."""
    session, ctx = sqlite_world
    person = find_person(session, ctx.settings, "address", ["Liisa.Korhonen@pohjolankone.fi"])
    erase(session, ctx.settings, person, by="test")
    name, email, key = session.execute(
        text("SELECT name, email, contact_key FROM contact WHERE name = 'Liisa Korhonen'")
    ).one()
    assert (name, email) == ("Liisa Korhonen", None) and key.startswith("erased:")
    dump = "\n".join(session.connection().connection.iterdump())
    assert "liisa.korhonen@" not in dump.lower()

    anna = find_person(session, ctx.settings, "number", ["+358 50 111 2222"])
    erase(session, ctx.settings, anna, by="test")
    annas = session.execute(
        text("SELECT count(*) FROM party_phone WHERE e164 = '+358501112222' AND staff_id > 0")
    ).scalar_one()
    assert annas == 1
