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
from collections import Counter
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
    return [(number, _stripped(item)) for number, item in enumerate(items, start=1)]


def _stripped(item: Any) -> Any:
    """An item's fields with the spaces around their text removed, as the CSV reader removes
    them from every cell, so that "91011" and "91011 " are one customer in either format.

    Only here, not in the message schema: a ``crm.party/1`` message is upserted by its key
    exactly as sent, and the import must not change what the queue accepts."""
    if not isinstance(item, dict):
        return item
    return {key: _strip(value) if key in COLUMNS else value for key, value in item.items()}


def _strip(value: Any) -> Any:
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, list):
        return [v.strip() if isinstance(v, str) else v for v in value]
    return value


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        # A spreadsheet's "CSV" in the Windows code page of Finnish and Swedish.
        return data.decode("cp1252", errors="replace")


def _csv_items(data: bytes) -> list[tuple[int, Any]]:
    return _read_csv(_decode(data))


#: Blank lines before the header: nothing but spaces and delimiters (a spreadsheet's empty row).
LEADING_BLANK_LINES = re.compile(r"(?:[^\S\r\n]|[,;])*(?:\r\n|\r|\n)")
#: How many column names an error lists (a header may have thousands of them).
NAMES_SHOWN = 20


def _read_csv(text: str) -> list[tuple[int, Any]]:
    # Blank rows are skipped, before the header too; they still count in the row numbers, as
    # a spreadsheet shows them.
    header_row, start = 1, 0
    while blank := LEADING_BLANK_LINES.match(text, start):
        header_row, start = header_row + 1, blank.end()
    text = text[start:]
    header_line = text.splitlines()[0] if text.strip() else ""
    if not header_line:
        raise ImportFileError("the file is empty: the first row names the columns")
    # Spreadsheets in Finnish locales write ";" (the comma is the decimal separator).
    delimiter = max(",;\t", key=header_line.count)
    lines = _Lines(text)
    reader = csv.reader(lines, delimiter=delimiter)
    header = [h.strip().lower() for h in _next_row(reader, lines, header_row)]
    unknown = [h for h in header if h not in COLUMNS]
    if unknown or "kind" not in header:
        problem = f"unknown column(s) {_names(unknown)}" if unknown else "no column kind"
        raise ImportFileError(f"{problem}; the columns are: {', '.join(COLUMNS)}")
    twice = sorted(h for h, n in Counter(header).items() if n > 1)
    if twice:
        raise ImportFileError(f"column(s) named twice: {_names(twice)}")
    items: list[tuple[int, Any]] = []
    number = header_row
    while True:
        number += 1
        try:
            cells = _next_row(reader, lines, number)
        except StopIteration:
            break
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


class _Lines:
    """The lines of a CSV text for ``csv.reader``, noting when the reader asks past the last.

    The reader asks for another line in the middle of a row only while a quoted field is open
    (every other row ends at its line break). Python's reader then returns the rest of the
    file as that one field and raises nothing (``strict=True`` would, but it also refuses
    ``"Savon Puu Oy" ;``, a space after the closing quote that spreadsheets write and the
    reader reads right), so a row that reached the end of the file this way is refused here."""

    def __init__(self, text: str) -> None:
        self._lines = io.StringIO(text, newline="")
        self.exhausted = False

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        line = self._lines.readline()
        if not line:
            self.exhausted = True
            raise StopIteration
        return line


def _next_row(reader: Any, lines: _Lines, number: int) -> list[str]:
    """The next row of ``reader``; ``StopIteration`` at the end of the file."""
    try:
        cells: list[str] = next(reader)
    except csv.Error as exc:
        raise ImportFileError(f"not a readable CSV file: row {number}: {exc}") from exc
    if lines.exhausted:
        raise ImportFileError(
            f"row {number}: a quoted field is never closed (its opening quote takes in "
            "every later line of the file)"
        )
    return cells


def _names(names: list[str]) -> str:
    """Column names for an error: each escaped and shortened, and at most NAMES_SHOWN of them."""
    unique = list(dict.fromkeys(names))
    shown = [_printable(name) for name in unique[:NAMES_SHOWN]]
    if len(unique) > NAMES_SHOWN:
        shown.append(f"and {len(unique) - NAMES_SHOWN} more")
    return ", ".join(shown)


def _printable(name: str, limit: int = 60) -> str:
    """A name safe to print on a terminal: an empty one, or one with control characters (an
    escape sequence), is shown as a Python literal; a long one is cut."""
    short = name if len(name) <= limit else name[:limit] + "…"
    return short if short and short.isprintable() else repr(short)


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
