"""Human-readable output of the command line (rich tables); ``--json`` bypasses all of this."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.table import Table

#: Piped output (CI logs, `| less`) gets wide tables instead of an 80-column squeeze.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    t = Table(title=title, title_justify="left")
    for column in columns:
        t.add_column(column)
    for row in rows:
        t.add_row(*["" if v is None else str(v) for v in row])
    console.print(t)


def events_table(title: str, events: list[dict[str, Any]]) -> None:
    table(
        title,
        ["id", "when", "category", "class", "customer", "contact", "seller", "subject", "status"],
        [
            [
                e["id"],
                e["occurred_at"][:16].replace("T", " "),
                e["category"],
                e["class"],
                e["customer_number"] or f"({e['link_state']})",
                e["contact"],
                e["seller"],
                (e["subject"] or "")[:60],
                e["status"],
            ]
            for e in events
        ],
    )


def _dash(value: Any) -> str:
    return "–" if value is None else str(value)


def seller_view(username: str, name: str, cards: list[dict[str, Any]]) -> None:
    console.print(f"[bold]Myyjän näkymä / seller view: {name} ({username})[/bold]")
    for card in cards:
        target = card.get("target")
        target_text = ""
        if target:
            weekly, monthly = (_dash(target["weekly"]), _dash(target["monthly"]))
            target_text = (
                f" · tavoite/target: week {card['count_week']}/{weekly},"
                f" month {card['count_month']}/{monthly}"
            )
        title = (
            f"{card['card']} — {card['week']}: {card['count_week']}, "
            f"{card['month']}: {card['count_month']}{target_text}"
        )
        rows = [
            [
                e["occurred_at"][:16].replace("T", " "),
                e["subject"][:60],
                e["status"],
                "✓" if e["in_week"] else "",
                "✓" if e["in_month"] else "",
            ]
            for e in card["events"]
        ]
        rows += [
            ["follow-up", f["reason"][:60], "open", "", ""] for f in card.get("follow_ups", [])
        ]
        table(title, ["when", "subject", "status", "week", "month"], rows)


def progress(rows: list[dict[str, Any]]) -> None:
    table(
        "Tavoitteet / targets progress",
        ["seller", "category", "period", "target", "actual", "expected by now", "pace"],
        [
            [
                r["seller"],
                r["category"],
                r["period"],
                r["target"] if r["target"] is not None else "–",
                r["actual"],
                r["expected_by_now"],
                r["pace"],
            ]
            for r in rows
        ],
    )
