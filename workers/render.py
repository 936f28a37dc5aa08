"""Human-readable output of the command line (rich tables); ``--json`` bypasses all of this."""

from __future__ import annotations

import sys
import textwrap
from typing import Any

from rich.console import Console
from rich.table import Table

#: Piped output (CI logs, `| less`) gets wide tables instead of an 80-column squeeze.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def brief(text: str | None, width: int = 400) -> str:
    """``text`` for a table cell: whole when it fits, else cut at a word and marked "…" (never
    in the middle of a word; the table wraps it)."""
    text = " ".join((text or "").split())
    return text if len(text) <= width else textwrap.shorten(text, width, placeholder=" …")


def table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    t = Table(title=title, title_justify="left")
    for column in columns:
        t.add_column(column)
    for row in rows:
        t.add_row(*["" if v is None else str(v) for v in row])
    console.print(t)


def tasks_table(title: str, rows: list[dict[str, Any]]) -> None:
    """Work tasks: overdue ones marked."""
    table(
        title,
        ["id", "due", "task", "assignee", "event", "customer", "state"],
        [
            [
                r["id"],
                (r["due"] or "–") + (" (myöhässä / overdue)" if r["overdue"] else ""),
                brief(r["title"], 120),
                r["assignee"] or "–",
                f"{r['event_id']}: {brief(r['event_subject'], 60)}",
                r["customer_number"] or "–",
                r["state"],
            ]
            for r in rows
        ],
    )


def events_table(title: str, events: list[dict[str, Any]]) -> None:
    table(
        title,
        ["id", "when", "category", "class", "customer", "contact", "seller", "subject", "state"],
        [
            [
                e["id"],
                e["occurred_at"][:16].replace("T", " "),
                e["category"],
                e["class"],
                e["customer_number"] or f"({e['link_state']})",
                e["contact"],
                e["seller"],
                subject_cell(e),
                status_words(e),
            ]
            for e in events
        ],
    )


def status_words(event: dict[str, Any]) -> str:
    """An event's CRM status, and its source's status where that differs (a call's)."""
    state, status = event["state"], event.get("status")
    return f"{state} · {status}" if status and status != state else str(state)


def subject_cell(event: dict[str, Any]) -> str:
    """The subject, and where a visit took place."""
    subject = brief(event["subject"], 60)
    return f"{subject} · {brief(event['location'], 60)}" if event.get("location") else subject


def _dash(value: Any) -> str:
    return "–" if value is None else str(value)


def _target_text(progress: dict[str, Any] | None, label: str) -> str:
    if not progress or progress["target"] is None:
        return ""
    pace = progress["pace"]
    marker = f"[red]{pace}[/red]" if pace == "behind" else f"[green]{pace}[/green]"
    return (
        f"{label} {progress['actual']}/{progress['target']}"
        f" (expected by now {progress['expected_by_now']}, {marker})"
    )


def seller_view(username: str, name: str, cards: list[dict[str, Any]]) -> None:
    """Myyjän näkymä: one table per card; the counts are the ✓ marks of the rows below."""
    console.print(f"[bold]Myyjän näkymä / seller view: {name} ({username})[/bold]")
    for card in cards:
        console.print()
        console.print(
            f"[bold]{card['card']}[/bold] — viikko/week {card['week']}: {card['count_week']} · "
            f"kuukausi/month {card['month']}: {card['count_month']}",
            highlight=False,
        )
        target = card.get("target")
        if target:
            parts = [
                _target_text(target.get("week"), "week target"),
                _target_text(target.get("month"), "month target"),
            ]
            text = " · ".join(p for p in parts if p)
            console.print("  tavoite/target: " + (text or "none set"))
        rows = [
            [
                e["occurred_at"][:16].replace("T", " "),
                (e["subject"] or "")[:60],
                status_words(e),
                "✓" if e["in_week"] else "",
                "✓" if e["in_month"] else "",
            ]
            for e in card["events"]
        ]
        rows += [
            [f"follow-up (event {f['event_id']})", (f["reason"] or "")[:60], "open", "", ""]
            for f in card.get("follow_ups", [])
        ]
        if rows:
            table("", ["when", "subject", "status", "week", "month"], rows)
        else:
            console.print("  ei tapahtumia tässä kuussa / no events this month")


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
