"""Numbers the database keeps: what a command, a path or a query may name before it is a
question no row can answer."""

from __future__ import annotations

#: The largest id of a row, and the largest count a column keeps: PostgreSQL's ``integer``.
#: A larger number names no row; sent to the database it would fail the statement.
MAX_ROW_ID = 2**31 - 1


def row_id(text: str) -> int | None:
    """The id ``text`` names (ASCII digits, at most :data:`MAX_ROW_ID`); None for anything
    else, so that a number no row can have is "no such row" and not a failed statement."""
    if not (text.isascii() and text.isdigit()):
        return None
    value = int(text)
    return value if value <= MAX_ROW_ID else None
