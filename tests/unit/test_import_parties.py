"""Reading and applying a master-data file: every row valid, or nothing imported."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from models.parties import Contact, ContactEmail, Customer, CustomerDomain, PartyPhone, Staff
from tasks.context import StageContext
from tasks.ingest.call import ingest_call
from tasks.party_import import ImportFileError, apply_plan, read_party_file
from tests.conftest import EXAMPLES
from tests.master_data import another_delivery, event_json, inbound_call

#: A spreadsheet export in a Finnish locale: semicolons, a byte order mark, several values in
#: one cell, "kyllä"/"ei".
GOOD_CSV = (
    "\ufeffkind;customer_number;username;name;email;emails;email_domains;phones;seller;"
    "extension;role;manager;time_zone;active\n"
    "staff;;ville;Ville Koskinen;ville.koskinen@myyntitalo.fi;;;050 777 8888;;205;seller;"
    "helena;Europe/Helsinki;kyllä\n"
    "staff;;olli;Olli Entinen;;;;;;;;;;ei\n"
    "customer;20001;;Savon Puu Oy;;;savonpuu.fi, puu.example;017 555 0000;ville;;;;;\n"
    'contact;20001;;Pekka Puu;pekka@savonpuu.fi;"pekka@puu.example, pp@savonpuu.fi";;'
    "040 999 8888 | 017 555 0001;;;;;;\n"
)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def count(db: Session, model: type) -> int:
    return db.scalar(select(func.count()).select_from(model)) or 0


def test_a_good_csv_file_is_applied_through_the_party_stage(
    world: Session, ctx: StageContext, tmp_path: Path
) -> None:
    unknown = ingest_call(
        world, ctx, inbound_call("before-import", "040 999 8888", "2026-11-24T09:00:00+02:00")
    )
    plan = read_party_file(write(tmp_path, "erp.csv", GOOD_CSV), "erp-export")
    assert plan.errors == []
    assert [row for row, _ in plan.rows] == [2, 3, 4, 5]
    ticks: list[int] = []
    result = apply_plan(world, ctx, plan, lambda: ticks.append(1))
    assert len(ticks) == 4
    assert result.imported == {"customer": 1, "contact": 1, "staff": 2}
    assert result.relinked == [unknown.event_id]

    ville = world.scalar(select(Staff).where(Staff.username == "ville"))
    olli = world.scalar(select(Staff).where(Staff.username == "olli"))
    assert ville is not None and ville.active is True and ville.extension == "205"
    assert olli is not None and olli.active is False
    pekka = world.scalar(select(Contact).where(Contact.name == "Pekka Puu"))
    assert pekka is not None and pekka.email == "pekka@savonpuu.fi"
    relinked = event_json(world, unknown.event_id)
    assert (relinked["customer_number"], relinked["contact"], relinked["seller"]) == (
        "20001",
        "Pekka Puu",
        "ville",
    )
    assert ville.id in result.sellers


def test_a_bad_row_is_reported_with_its_row_number_and_nothing_is_applied(
    db: Session, tmp_path: Path
) -> None:
    bad = GOOD_CSV.replace("ville.koskinen@myyntitalo.fi", "ville(at)myyntitalo.fi").replace(
        ";Olli Entinen;", ";;"
    )
    plan = read_party_file(write(tmp_path, "bad.csv", bad), "erp")
    assert [(e.row, sorted(e.errors)) for e in plan.errors] == [(2, ["email"]), (3, ["name"])]
    assert "email: Not a valid email address." in plan.errors[0].reason
    assert [row for row, _ in plan.rows] == [4, 5]
    assert count(db, Staff) == count(db, Customer) == 0  # reading never writes


@pytest.mark.parametrize(
    ("text", "row", "field", "reason"),
    [
        ("kind,name\nsupplier,Tukku Oy\n", 2, "kind", "kind must be one of"),
        ("kind,username,name,role\nstaff,x,X,director\n", 2, "role", "Must be one of"),
        ("kind,customer_number,name,username\ncustomer,1,A,x\n", 2, "username", "Unknown field"),
        ("kind,username,name,active\nstaff,x,X,maybe\n", 2, "active", "Not a valid boolean"),
        ("kind,username,name\nstaff,x,X\n\nstaff,x,Y\n", 4, "", "the same staff as row 2"),
        ("kind,username,name\nstaff,x,X,extra\n", 2, "", "4 cells, 3 columns"),
        ("kind,username,name\nstaff,x,X\x00Y\n", 2, "name", "Contains a NUL character"),
    ],
)
def test_bad_csv_rows(tmp_path: Path, text: str, row: int, field: str, reason: str) -> None:
    plan = read_party_file(write(tmp_path, "rows.csv", text), "erp")
    (error,) = plan.errors
    assert error.row == row
    assert reason in error.reason
    if field:
        assert field in error.errors


def test_json_items_are_numbered_from_one(tmp_path: Path) -> None:
    items = [
        {"kind": "customer", "customer_number": "20001", "name": "Savon Puu Oy"},
        {"kind": "contact", "customer_number": "20001", "name": "Pekka", "email": "nope"},
        "not an object",
        {
            "schema": "crm.party/1",
            "source_system": "erp",
            "kind": "staff",
            "username": "x",
            "name": "X",
            "colour": "red",
        },
    ]
    plan = read_party_file(write(tmp_path, "erp.json", json.dumps(items)), "erp")
    assert [(e.row, sorted(e.errors)) for e in plan.errors] == [
        (2, ["email"]),
        (3, []),
        (4, ["colour"]),
    ]
    assert plan.errors[1].reason == "expected an object, got str"
    assert plan.rows[0][1]["source_system"] == "erp"


@pytest.mark.parametrize(
    ("name", "text", "reason"),
    [
        ("a.csv", "kind,colour\nstaff,red\n", "unknown column(s) colour; the columns are: kind"),
        ("a.csv", "name,username\nX,x\n", "no column kind"),
        ("a.csv", "", "the file is empty"),
        ("a.json", "{not json", "not JSON"),
        ("a.json", "[" * 100_000 + "]" * 100_000, "the JSON is nested deeper than 32 levels"),
        ("a.xlsx", "", "give a .csv or .json file"),
        ("a.csv", "kind,name,name\nstaff,a,b\n", "column(s) named twice: name"),
        ("a.csv", "\n\n", "the file is empty"),
        ("a.csv", " \t\n;;\n", "the file is empty"),
        ("a.csv", "kind,\x1b[2J,\n", "unknown column(s) '\\x1b[2j', ''; the columns"),
        (
            "a.csv",
            'kind,customer_number,name,seller\ncustomer,90031,"Alpha Oy,anna\n'
            "customer,90032,Beta Oy,anna\ncustomer,90033,Gamma Oy,anna\n",
            "row 2: a quoted field is never closed",
        ),
        ("a.csv", 'kind,"name\nstaff,x\n', "row 1: a quoted field is never closed"),
        ("a.csv", 'kind,name\nstaff,"' + "x" * 200_000 + '"\n', "row 2: field larger than"),
    ],
)
def test_unreadable_files(tmp_path: Path, name: str, text: str, reason: str) -> None:
    with pytest.raises(ImportFileError) as refused:
        read_party_file(write(tmp_path, name, text), "erp")
    assert reason in str(refused.value)


def test_a_header_of_many_repeated_columns_is_refused(tmp_path: Path) -> None:
    header = ",".join(["kind"] + ["name"] * 100_000)
    with pytest.raises(ImportFileError) as refused:
        read_party_file(write(tmp_path, "wide.csv", header + "\n"), "erp")
    assert str(refused.value) == "column(s) named twice: name"


def test_an_error_lists_at_most_twenty_column_names(tmp_path: Path) -> None:
    header = ",".join(["kind"] + [f"colour{i}" for i in range(100_000)] + ["\x1b[2J"])
    with pytest.raises(ImportFileError) as refused:
        read_party_file(write(tmp_path, "wide.csv", header + "\n"), "erp")
    listed = ", ".join(f"colour{i}" for i in range(20))
    assert str(refused.value).startswith(f"unknown column(s) {listed}, and 99981 more; ")
    assert str(refused.value).isprintable()


def test_a_quoted_field_over_several_lines_is_one_cell(tmp_path: Path) -> None:
    text = 'kind,customer_number,name\ncustomer,1,"Alpha\nOy"\ncustomer,2,"Beta Oy" \n'
    plan = read_party_file(write(tmp_path, "lines.csv", text), "erp")
    assert plan.errors == []
    assert [(row, message["name"]) for row, message in plan.rows] == [
        (2, "Alpha\nOy"),
        (3, "Beta Oy"),
    ]


@pytest.mark.parametrize("blank", ["\n", "   \n", ";;;\r\n", "\n \t\n"])
def test_blank_lines_before_the_header_are_skipped(tmp_path: Path, blank: str) -> None:
    text = blank + "kind;customer_number;name\ncustomer;1;A\n\ncustomer;1;B\n"
    plan = read_party_file(write(tmp_path, "blank.csv", text), "erp")
    header_row = 1 + blank.count("\n")
    assert [row for row, _ in plan.rows] == [header_row + 1]
    assert [(e.row, e.reason) for e in plan.errors] == [
        (header_row + 3, f"the same customer as row {header_row + 1} (1)")
    ]


def test_json_text_is_stripped_as_csv_cells_are(tmp_path: Path) -> None:
    items = [
        {"kind": "customer", "customer_number": "91011", "name": "Alpha Oy"},
        {"kind": "customer", "customer_number": "91011 ", "name": "Beta Oy"},
        {
            "kind": " contact",
            "customer_number": " 91011",
            "name": " Pekka Puu ",
            "email": " pekka@alpha.example ",
            "emails": [" pp@alpha.example"],
        },
    ]
    plan = read_party_file(write(tmp_path, "erp.json", json.dumps(items)), "erp")
    assert [(e.row, e.reason) for e in plan.errors] == [(2, "the same customer as row 1 (91011)")]
    assert [message for _, message in plan.rows][1] == {
        "schema": "crm.party/1",
        "source_system": "erp",
        "kind": "contact",
        "customer_number": "91011",
        "name": "Pekka Puu",
        "email": "pekka@alpha.example",
        "emails": ["pp@alpha.example"],
    }


def test_a_windows_spreadsheet_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "ansi.csv"
    path.write_bytes("kind;customer_number;name\ncustomer;20001;Järvi-Sähkö Oy\n".encode("cp1252"))
    plan = read_party_file(path, "erp")
    assert plan.errors == []
    assert plan.rows[0][1]["name"] == "Järvi-Sähkö Oy"


def master_data(db: Session) -> dict[str, Any]:
    """Everything matching uses, by natural keys (ids differ between two loads)."""
    staff = {s.id: s for s in db.scalars(select(Staff))}
    customers = {c.id: c for c in db.scalars(select(Customer))}
    phones: dict[tuple[str, int], set[str]] = {}
    for p in db.scalars(select(PartyPhone)):
        owner = ("staff", p.staff_id) if p.staff_id else ("customer", p.customer_id)
        owner = ("contact", p.contact_id) if p.contact_id else owner
        phones.setdefault(owner, set()).add(p.e164)  # type: ignore[arg-type]
    emails: dict[int, set[str]] = {}
    for e in db.scalars(select(ContactEmail)):
        emails.setdefault(e.contact_id, set()).add(e.email)
    return {
        "staff": {
            s.username: (
                s.name,
                s.email,
                s.extension,
                s.role,
                staff[s.manager_id].username if s.manager_id else None,
                s.time_zone,
                s.active,
                s.placeholder,
                phones.get(("staff", s.id)),
            )
            for s in staff.values()
        },
        "customers": {
            c.customer_number: (
                c.name,
                staff[c.seller_id].username if c.seller_id else None,
                set(
                    db.scalars(
                        select(CustomerDomain.domain).where(CustomerDomain.customer_id == c.id)
                    )
                ),
                phones.get(("customer", c.id)),
            )
            for c in customers.values()
        },
        "contacts": {
            (customers[c.customer_id].customer_number, c.name): (
                c.email,
                emails.get(c.id),
                phones.get(("contact", c.id)),
            )
            for c in db.scalars(select(Contact))
        },
    }


def test_the_sample_csv_gives_the_same_master_data_as_the_sample_messages(
    world: Session, ctx: StageContext
) -> None:
    from_messages = master_data(world)
    for model in (PartyPhone, ContactEmail, CustomerDomain, Contact, Customer):
        world.execute(delete(model))
    world.execute(update(Staff).values(manager_id=None))
    world.execute(delete(Staff))
    plan = read_party_file(EXAMPLES / "parties.csv", "erp")
    assert plan.errors == []
    result = apply_plan(world, another_delivery(ctx), plan)
    assert result.imported == {"customer": 2, "contact": 4, "staff": 3}
    assert master_data(world) == from_messages
