"""``insert_rows``: a batch's rows in one statement, stored exactly as the ORM would store them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import JSON, func, select
from sqlalchemy.exc import DataError
from sqlalchemy.orm import Session

from models.db import SENT_ONCE_FROM, JsonText, insert_rows, table_of
from models.ledger import Delivery, InboundMessage
from tasks.context import StageContext
from tasks.store import record_deliveries

WHEN = datetime(2026, 3, 1, 8, 30, 15, 123456, tzinfo=UTC)


def ledger_rows(prefix: str) -> list[dict[str, object]]:
    return [
        {
            "idempotency_key": f"{prefix}:{n}",
            "schema": "crm.call/1",
            "source_kind": "call",
            "source_system": "pbx",
            "source_id": f"call-{n}",
            "payload": {"from": "+358401234567", "note": 'Äänipuhelu ✓ "lainaus"', "n": n},
            "event_id": None,
            "received_at": WHEN + timedelta(seconds=n),
        }
        for n in range(3)
    ]


def stored(session: Session, prefix: str) -> list[dict[str, object]]:
    found = session.scalars(
        select(InboundMessage)
        .where(InboundMessage.idempotency_key.startswith(f"{prefix}:"))
        .order_by(InboundMessage.idempotency_key)
    ).all()
    return [
        {
            "idempotency_key": m.idempotency_key,
            "schema": m.schema,
            "source_kind": m.source_kind,
            "source_system": m.source_system,
            "source_id": m.source_id,
            "payload": m.payload,
            "event_id": m.event_id,
            "received_at": m.received_at,
        }
        for m in found
    ]


def test_rows_read_back_as_given_on_postgresql(db: Session) -> None:
    rows = ledger_rows("pg")
    insert_rows(db, table_of(InboundMessage), rows)
    db.expire_all()
    assert stored(db, "pg") == rows


def many_ledger_rows(prefix: str) -> list[dict[str, object]]:
    """A batch large enough for its constant columns to be sent once."""
    return [
        {**row, "idempotency_key": f"{prefix}:{n:03d}", "source_id": f"call-{n}"}
        for n in range(SENT_ONCE_FROM)
        for row in ledger_rows(prefix)[:1]
    ]


def test_values_alike_but_not_the_same_are_each_stored_as_given(db: Session) -> None:
    """A column whose rows all hold one value goes as that value once: 1 and 1.0 are equal in
    Python but not the same JSON, True and 1 not the same value, so neither is sent once."""
    rows = many_ledger_rows("alike")
    for row, n in zip(rows, (1, 1.0) * SENT_ONCE_FROM, strict=False):
        row["payload"] = {"n": n}
        row["received_at"] = WHEN  # the same time in every row: sent once
    insert_rows(db, table_of(InboundMessage), rows)
    db.expire_all()
    found = stored(db, "alike")
    assert found == rows
    assert {type(row["payload"]["n"]) for row in found[:2]} == {int, float}  # type: ignore[index]


def test_one_row_and_rows_all_alike_but_their_key(db: Session) -> None:
    one = ledger_rows("single")[:1]
    insert_rows(db, table_of(InboundMessage), one)
    alike = many_ledger_rows("same")
    for row in alike:
        row["payload"], row["received_at"], row["source_id"] = {"same": True}, WHEN, "call"
    insert_rows(db, table_of(InboundMessage), alike)
    db.expire_all()
    assert stored(db, "single") == one
    assert stored(db, "same") == alike


def test_rows_read_back_as_given_on_sqlite(sqlite_world: tuple[Session, StageContext]) -> None:
    session, _ctx = sqlite_world
    rows = ledger_rows("lite")
    insert_rows(session, table_of(InboundMessage), rows)
    session.expire_all()
    assert stored(session, "lite") == rows


JSON_VALUES: list[object] = [
    None,  # JSON's null, not SQL's NULL: the column type's none_as_null is off
    JSON.NULL,
    [],
    'Äänipuhelu \u2713 "x" \\ \n',
    {"b": [1, 2.5, True, None], "a": {"nested": "ü"}},
]


@pytest.mark.parametrize("many", [False, True], ids=["few", "sent-once-sized"])
def test_json_values_are_stored_as_the_orm_stores_them(db: Session, many: bool) -> None:
    """JSON goes as its text and is parsed once by the server, each kind of value as the ORM
    would store it; a JsonText (a writer's own spelling) is the value it spells."""
    prefix = f"json{int(many)}"
    rows = many_ledger_rows(prefix) if many else ledger_rows(prefix)
    values = [*JSON_VALUES, JsonText('{"spelled":["by","its","writer"]}')]
    for n, row in enumerate(rows):
        row["payload"] = values[n % len(values)]
    insert_rows(db, table_of(InboundMessage), rows)
    db.expire_all()
    for row, got in zip(rows, stored(db, prefix), strict=True):
        value = row["payload"]
        if isinstance(value, JsonText):
            value = {"spelled": ["by", "its", "writer"]}
        assert got["payload"] == (None if value is JSON.NULL else value)
    kinds = db.execute(
        select(func.jsonb_typeof(InboundMessage.payload))
        .where(InboundMessage.idempotency_key.startswith(f"{prefix}:"))
        .order_by(InboundMessage.idempotency_key)
    ).scalars()
    assert [*kinds][:2] == ["null", "null"]  # stored JSON null, not SQL NULL


def test_a_writers_json_text_is_stored_as_its_value_on_sqlite(
    sqlite_world: tuple[Session, StageContext],
) -> None:
    session, _ctx = sqlite_world
    rows = ledger_rows("litejson")
    rows[0]["payload"] = JsonText('{"a":[1,"ü"]}')
    insert_rows(session, table_of(InboundMessage), rows)
    session.expire_all()
    assert stored(session, "litejson")[0]["payload"] == {"a": [1, "ü"]}


def test_a_value_too_long_for_its_column_is_refused_not_cut(db: Session) -> None:
    """The arrays go as text: a cast to varchar(200) would cut the key silently."""
    rows = ledger_rows("long")
    rows[1]["idempotency_key"] = "long:" + "k" * 300
    with pytest.raises(DataError), db.begin_nested():
        insert_rows(db, table_of(InboundMessage), rows)
    assert stored(db, "long") == []


def test_a_later_outcome_of_the_same_message_replaces_the_earlier(db: Session) -> None:
    """The batch's deliveries go through ``insert_rows`` with their ON CONFLICT clause."""
    record_deliveries(db, [("b/0", "crm.ingest.call", "failed", None, "bug: x")])
    record_deliveries(
        db,
        [
            ("b/0", "crm.ingest.call", "stored", None, "created"),
            ("b/1", "crm.ingest.call", "duplicate", None, ""),
        ],
    )
    found = {
        d.task_id: (d.outcome, d.detail)
        for d in db.scalars(select(Delivery).where(Delivery.task_id.startswith("b/")))
    }
    assert found == {"b/0": ("stored", "created"), "b/1": ("duplicate", "")}


def test_an_on_conflict_clause_is_refused_on_sqlite(
    sqlite_world: tuple[Session, StageContext],
) -> None:
    session, _ctx = sqlite_world
    with pytest.raises(ValueError, match="PostgreSQL"):
        insert_rows(session, table_of(InboundMessage), ledger_rows("x"), "ON CONFLICT DO NOTHING")
