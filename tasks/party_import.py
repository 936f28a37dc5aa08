"""Bulk import of master data from the ERP: a CSV or JSON file of customers, contacts and staff.

Every row is validated first, with the same rules as a ``crm.party/1`` message; a file with
any bad row imports nothing and every error is reported with its row number. A valid file is
applied through the party stage itself (``tasks.ingest.party``), row by row in one transaction,
so placeholders, upserts and the automatic re-link behave exactly as for messages.
The CSV columns are described in docs/master-data.md.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from models.jsondoc import read_json
from models.schemas.common import MessageInvalid
from models.schemas.party import PARTY_SCHEMAS, SCHEMA, load_party_message
from tasks.context import StageContext
from tasks.ingest.party import ingest_party, natural_key

#: The CSV columns: the fields of the three kinds of party (docs/master-data.md).
COLUMNS = (
    "kind",
    "customer_number",
    "username",
    "name",
    "email",
    "emails",
    "email_domains",
    "phones",
    "seller",
    "extension",
    "role",
    "manager",
    "time_zone",
    "active",
)
LIST_COLUMNS = frozenset({"emails", "email_domains", "phones"})
#: Several values in one cell: commas, semicolons or vertical bars (none occurs in a phone
#: number, an address or a domain).
LIST_SEPARATOR = re.compile(r"[,;|]")
BOOLEANS = {"kyllä": "true", "ei": "false"}


class ImportFileError(Exception):
    """The file as a whole cannot be read (not CSV or JSON, unknown columns, …)."""


@dataclass
class RowError:
    row: int
    reason: str
    errors: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"row": self.row, "reason": self.reason, "errors": self.errors}


@dataclass
class ImportPlan:
    """The validated rows of a file, or the reasons it cannot be imported."""

    format: str
    rows: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    errors: list[RowError] = field(default_factory=list)


@dataclass
class ImportResult:
    imported: dict[str, int] = field(default_factory=dict)
    relinked: list[int] = field(default_factory=list)
    sellers: set[int] = field(default_factory=set)


def read_party_file(path: Path, source_system: str) -> ImportPlan:
    """Parse and validate every row of a CSV or JSON file (by its extension)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImportFileError(str(exc.strerror or exc)) from exc
    suffix = path.suffix.lower()
    if suffix == ".json":
        plan = ImportPlan("json")
        items = _json_items(data)
    elif suffix in (".csv", ".txt", ".tsv"):
        plan = ImportPlan("csv")
        items = _csv_items(data)
    else:
        raise ImportFileError("give a .csv or .json file")
    seen: dict[tuple[str, str], int] = {}
    for number, item in items:
        if isinstance(item, RowError):
            plan.errors.append(item)
            continue
        if not isinstance(item, dict):
            plan.errors.append(RowError(number, f"expected an object, got {type(item).__name__}"))
            continue
        message = {"schema": SCHEMA, "source_system": source_system, **item}
        try:
            loaded = load_party_message(message)
        except MessageInvalid as exc:
            plan.errors.append(RowError(number, exc.reason, exc.errors))
            continue
        key = (loaded["kind"], natural_key(loaded).lower())
        if key in seen:
            plan.errors.append(
                RowError(number, f"the same {key[0]} as row {seen[key]} ({natural_key(loaded)})")
            )
            continue
        seen[key] = number
        plan.rows.append((number, message))
    return plan


def _json_items(data: bytes) -> list[tuple[int, Any]]:
    try:
        document = read_json(data)
    except ValueError as exc:
        raise ImportFileError(str(exc)) from exc
    items = document if isinstance(document, list) else [document]
    # Items are numbered from 1, as a person counts them.
    return list(enumerate(items, start=1))


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        # A spreadsheet's "CSV" in the Windows code page of Finnish and Swedish.
        return data.decode("cp1252", errors="replace")


def _csv_items(data: bytes) -> list[tuple[int, Any]]:
    try:
        return _read_csv(_decode(data))
    except csv.Error as exc:  # a NUL byte, an unterminated quote at the end, …
        raise ImportFileError(f"not a readable CSV file: {exc}") from exc


def _read_csv(text: str) -> list[tuple[int, Any]]:
    header_line = text.splitlines()[0] if text.strip() else ""
    if not header_line:
        raise ImportFileError("the file is empty: the first row names the columns")
    # Spreadsheets in Finnish locales write ";" (the comma is the decimal separator).
    delimiter = max(",;\t", key=header_line.count)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = [h.strip().lower() for h in next(reader)]
    unknown = [h for h in header if h not in COLUMNS]
    if unknown or "kind" not in header:
        problem = f"unknown column(s) {', '.join(unknown)}" if unknown else "no column kind"
        raise ImportFileError(f"{problem}; the columns are: {', '.join(COLUMNS)}")
    twice = sorted({h for h in header if header.count(h) > 1})
    if twice:
        raise ImportFileError(f"column(s) named twice: {', '.join(twice)}")
    items: list[tuple[int, Any]] = []
    # Row 1 is the header, as a spreadsheet numbers the rows.
    for number, cells in enumerate(reader, start=2):
        if not any(cell.strip() for cell in cells):
            continue
        if len(cells) > len(header):
            items.append((number, RowError(number, f"{len(cells)} cells, {len(header)} columns")))
            continue
        item: dict[str, Any] = {}
        for column, cell in zip(header, cells, strict=False):
            value = cell.strip()
            if not value:
                continue  # an empty cell is an absent field
            if column in LIST_COLUMNS:
                item[column] = [v.strip() for v in LIST_SEPARATOR.split(value) if v.strip()]
            elif column == "active":
                item[column] = BOOLEANS.get(value.lower(), value.lower())
            else:
                item[column] = value
        items.append((number, item))
    return items


def apply_plan(
    session: Session,
    ctx: StageContext,
    plan: ImportPlan,
    advance: Callable[[], None] = lambda: None,
) -> ImportResult:
    """Apply validated rows through the party stage; the caller commits once, at the end."""
    result = ImportResult({kind: 0 for kind in PARTY_SCHEMAS})
    for _, message in plan.rows:
        outcome = ingest_party(session, ctx, message)
        if outcome.outcome == "done":
            result.imported[message["kind"]] += 1
        result.sellers |= outcome.sellers_to_refresh
        result.relinked += outcome.relinked
        advance()
    return result
