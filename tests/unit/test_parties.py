"""Party master data (customers, contacts, staff) through the party stage, on a real database."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.exc import DataError
from sqlalchemy.orm import Session

from models.events import CrmEvent
from models.parties import Contact, Customer, CustomerDomain, PartyPhone, Staff
from tasks.context import StageContext
from tasks.errors import BadInput
from tasks.ingest.email import ingest_email
from tasks.ingest.party import ingest_party
from tasks.match import match_addresses, normalise_phone
from tasks.views import events_json
from tests.conftest import statements_run
from workers.publish import email_message_from_raw


def party(kind: str, **fields: Any) -> dict[str, Any]:
    return {"schema": "crm.party/1", "source_system": "erp", "kind": kind, **fields}


def customer_message(**fields: Any) -> dict[str, Any]:
    return party(
        "customer",
        **{
            "customer_number": "20001",
            "name": "Savon Puu Oy",
            "email_domains": ["savonpuu.fi"],
            "phones": [],
            **fields,
        },
    )


def staff_by_username(db: Session, username: str) -> Staff | None:
    return db.scalar(select(Staff).where(Staff.username == username))


def customer_by_number(db: Session, number: str) -> Customer:
    found = db.scalar(select(Customer).where(Customer.customer_number == number))
    assert found is not None
    return found


def phones_of(db: Session, **owner: int) -> dict[str, str]:
    ((column, owner_id),) = owner.items()
    return {
        p.raw: p.e164
        for p in db.scalars(select(PartyPhone).where(getattr(PartyPhone, column) == owner_id))
    }


# -- placeholders ---------------------------------------------------------------------------------


def test_customer_before_its_seller_gets_a_placeholder_filled_in_later(
    db: Session, ctx: StageContext
) -> None:
    ingest_party(db, ctx, customer_message(seller="ville"))
    placeholder = staff_by_username(db, "ville")
    assert placeholder is not None
    assert placeholder.placeholder is True
    assert customer_by_number(db, "20001").seller_id == placeholder.id

    result = ingest_party(
        db,
        ctx,
        party(
            "staff",
            username="ville",
            name="Ville Koskinen",
            email="Ville.Koskinen@myyntitalo.fi",
            phones=["050 777 8888"],
            extension="205",
            role="seller",
        ),
    )
    assert result.outcome == "done"
    db.expire_all()
    ville = staff_by_username(db, "ville")
    assert ville is not None
    assert ville.id == placeholder.id  # the same row, filled in
    assert ville.placeholder is False
    assert ville.name == "Ville Koskinen"
    assert ville.email == "ville.koskinen@myyntitalo.fi"
    assert ville.extension == "205"
    assert customer_by_number(db, "20001").seller_id == ville.id
    assert len(db.scalars(select(Staff).where(Staff.username == "ville")).all()) == 1


def test_contact_before_its_customer_and_manager_before_staff(
    db: Session, ctx: StageContext
) -> None:
    ingest_party(
        db,
        ctx,
        party("contact", customer_number="20002", name="Pekka Puu", email="pekka@savonpuu.fi"),
    )
    early = customer_by_number(db, "20002")
    assert early.placeholder is True
    ingest_party(db, ctx, customer_message(customer_number="20002", name="Savon Puu Oy"))
    db.expire_all()
    customer = customer_by_number(db, "20002")
    assert (customer.id, customer.placeholder, customer.name) == (early.id, False, "Savon Puu Oy")
    contact = db.scalar(select(Contact).where(Contact.email == "pekka@savonpuu.fi"))
    assert contact is not None and contact.customer_id == customer.id

    ingest_party(db, ctx, party("staff", username="tuula", name="Tuula T", manager="boss"))
    boss = staff_by_username(db, "boss")
    assert boss is not None and boss.placeholder is True
    tuula = staff_by_username(db, "tuula")
    assert tuula is not None and tuula.manager_id == boss.id


def test_party_updates_are_upserts(world: Session, ctx: StageContext) -> None:
    before = len(world.scalars(select(Contact)).all())
    ingest_party(
        world,
        ctx,
        party(
            "contact",
            customer_number="10001",
            name="Matti Virtanen (tekninen johtaja)",
            email="MATTI.VIRTANEN@pohjolankone.fi",
            phones=["040 123 4568"],
        ),
    )
    world.expire_all()
    assert len(world.scalars(select(Contact)).all()) == before
    matti = world.scalar(select(Contact).where(Contact.email == "matti.virtanen@pohjolankone.fi"))
    assert matti is not None
    assert matti.name == "Matti Virtanen (tekninen johtaja)"
    assert phones_of(world, contact_id=matti.id) == {"040 123 4568": "+358401234568"}


# -- phone numbers --------------------------------------------------------------------------------


def test_phone_numbers_are_normalised_to_e164(world: Session) -> None:
    matti = world.scalar(select(Contact).where(Contact.name == "Matti Virtanen"))
    assert matti is not None
    assert phones_of(world, contact_id=matti.id) == {"040 123 4567": "+358401234567"}
    jsahko = customer_by_number(world, "10002")
    assert phones_of(world, customer_id=jsahko.id) == {"09 4321 000": "+35894321000"}
    mikko = staff_by_username(world, "mikko")
    assert mikko is not None
    assert phones_of(world, staff_id=mikko.id) == {"050 333 4444": "+358503334444"}
    anna = staff_by_username(world, "anna")
    assert anna is not None
    assert phones_of(world, staff_id=anna.id) == {"+358 50 111 2222": "+358501112222"}


@pytest.mark.parametrize(
    ("raw", "e164"),
    [
        ("040 123 4567", "+358401234567"),
        ("+358 40 123 4567", "+358401234567"),
        ("00358401234567", "+358401234567"),
        ("(09) 4321 000", "+35894321000"),
        ("+46 8 123 456 78", "+46812345678"),
        ("201", None),
        ("", None),
        (None, None),
        ("not a number", None),
    ],
)
def test_normalise_phone(raw: str | None, e164: str | None) -> None:
    assert normalise_phone(raw, "FI") == e164


def test_unparseable_phone_is_reported_not_stored(db: Session, ctx: StageContext) -> None:
    result = ingest_party(db, ctx, customer_message(phones=["+358 14 260 1000", "vaihde"]))
    assert "vaihde" in result.detail
    customer = customer_by_number(db, "20001")
    assert phones_of(db, customer_id=customer.id) == {"+358 14 260 1000": "+358142601000"}


# -- free-mail domains ----------------------------------------------------------------------------


def test_free_mail_domain_is_not_used_for_matching(db: Session, ctx: StageContext) -> None:
    result = ingest_party(db, ctx, customer_message(email_domains=["Gmail.com", "savonpuu.fi"]))
    assert "gmail.com" in result.detail
    customer = customer_by_number(db, "20001")
    domains = db.scalars(
        select(CustomerDomain.domain).where(CustomerDomain.customer_id == customer.id)
    ).all()
    assert domains == ["savonpuu.fi"]

    by_free_mail = match_addresses(db, ["someone@gmail.com"], ctx.settings)
    assert by_free_mail.customer_id is None
    assert by_free_mail.state == "unlinked"
    by_domain = match_addresses(db, ["myynti@savonpuu.fi"], ctx.settings)
    assert by_domain.customer_id == customer.id


def test_email_from_free_mail_stays_unlinked(world: Session, ctx: StageContext) -> None:
    ingest_party(world, ctx, customer_message(email_domains=["gmail.com", "savonpuu.fi"]))
    raw = (
        "From: Tuntematon <tuntematon@gmail.com>\r\n"
        "To: crm@myyntitalo.fi\r\n"
        "Subject: Kysely\r\n"
        "Date: Tue, 24 Nov 2026 10:00:00 +0200\r\n"
        "Message-ID: <free-1@gmail.com>\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n"
        "Hei, onko teillä huoltoa?\r\n"
    ).encode()
    result = ingest_email(world, ctx, email_message_from_raw(raw, ctx.settings))
    assert result.outcome == "stored"
    event = events_json(world, [world.get_one(CrmEvent, result.event_id)])[0]
    assert event["customer_number"] is None
    assert "free-mail" in event["match_note"]


# -- invalid messages -----------------------------------------------------------------------------


def test_invalid_party_message_lists_field_errors(db: Session, ctx: StageContext) -> None:
    with pytest.raises(BadInput) as caught:
        ingest_party(
            db,
            ctx,
            party("customer", name="", email_domains="not a list", colour="red"),
        )
    errors = caught.value.errors
    assert {"customer_number", "name", "email_domains", "colour"} <= set(errors)
    assert "customer_number" in caught.value.reason
    assert db.scalars(select(Customer)).all() == []


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (party("supplier", name="X"), "kind"),
        (party("staff", username="x", name="X", role="admin"), "role"),
        (party("staff", username="x", name="X", email="not-an-email"), "email"),
        (party("contact", customer_number="10001"), "name"),
        ({**party("staff", username="x", name="X"), "schema": "crm.party/2"}, "schema"),
    ],
)
def test_invalid_party_messages(
    db: Session, ctx: StageContext, message: dict[str, Any], field: str
) -> None:
    with pytest.raises(BadInput) as caught:
        ingest_party(db, ctx, message)
    assert field in caught.value.errors
    assert db.scalars(select(Staff)).all() == []


def test_non_object_party_message_is_bad_input(db: Session, ctx: StageContext) -> None:
    with pytest.raises(BadInput):
        ingest_party(db, ctx, ["not", "an", "object"])


def test_nul_in_a_party_message_is_not_a_database_error(db: Session, ctx: StageContext) -> None:
    # Either refused as bad input (recorded, replayable) or stored without the NUL; never a
    # DataError, which the task wrapper treats as a bug and records as a failed message.
    message = customer_message(name="Savon\u0000Puu Oy")
    try:
        with db.begin_nested():
            ingest_party(db, ctx, message)
    except BadInput as exc:
        assert "name" in exc.errors
        return
    except DataError as exc:
        pytest.fail(
            "BUG outside tasks/ingest/party.py: a NUL character in a party message reaches "
            "PostgreSQL (jsonb ledger payload / text column) and fails with "
            f"{type(exc.orig).__name__} instead of BadInput; reject NUL in models/schemas "
            "common.Text (or strip it) before the ledger insert"
        )
    assert "\x00" not in customer_by_number(db, "20001").name


def test_staff_by_addresses_finds_what_find_staff_finds_in_one_query(
    world: Session, ctx: StageContext
) -> None:
    from tasks.match import find_staff, find_staff_by_addresses

    # A staff member whose username is another member's address wins it, as in find_staff.
    ingest_party(
        world,
        ctx,
        party("staff", username="mikko.nieminen@myyntitalo.fi", name="Alias", role="seller"),
    )
    addresses = [
        "Anna.Lahtinen@MyyntiTalo.fi",
        "mikko.nieminen@myyntitalo.fi",
        "matti.virtanen@pohjolankone.fi",
        " helena.salo@myyntitalo.fi ",
    ]
    with statements_run(world) as statements:
        found = find_staff_by_addresses(world, addresses)
    assert len(statements) == 1
    usernames = {a: (s.username if s else None) for a, s in found.items()}
    assert usernames == {
        "Anna.Lahtinen@MyyntiTalo.fi": "anna",
        "mikko.nieminen@myyntitalo.fi": "mikko.nieminen@myyntitalo.fi",
        "matti.virtanen@pohjolankone.fi": None,
        " helena.salo@myyntitalo.fi ": "helena",
    }
    for address in addresses:
        one = find_staff(world, address, ctx.settings)
        assert (one.username if one else None) == usernames[address]
