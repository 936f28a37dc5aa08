"""Time: naive inputs, the seller's zone, ISO weeks (``2026-W48``) and months (``2026-11``)."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time, timedelta
from typing import overload
from zoneinfo import ZoneInfo

WEEK_RE = re.compile(r"^(\d{4})-W(\d{2})$")
MONTH_RE = re.compile(r"^(\d{4})-(\d{2})$")


@overload
def aware(value: datetime, zone: ZoneInfo, notes: list[str], label: str) -> datetime: ...
@overload
def aware(
    value: datetime | None, zone: ZoneInfo, notes: list[str], label: str
) -> datetime | None: ...
def aware(value: datetime | None, zone: ZoneInfo, notes: list[str], label: str) -> datetime | None:
    """Attach ``zone`` to a naive time and record that assumption in ``notes``."""
    if value is None or value.tzinfo is not None:
        return value
    notes.append(f"{label} had no UTC offset; read as {zone.key}")
    return value.replace(tzinfo=zone)


def day_keys(day: date) -> tuple[str, str]:
    """The ISO week (``2026-W48``) and the month (``2026-11``) of a calendar day: the one
    spelling of the tally periods, for the counts stored and the recount alike. Years have
    four digits (``0999-W18``), as periods are read, from the year 2 on that events may have."""
    year, week, _weekday = day.isocalendar()
    return f"{year:04d}-W{week:02d}", f"{day.year:04d}-{day.month:02d}"


def period_keys(moment: datetime, zone: ZoneInfo) -> tuple[str, str]:
    """The week and month of ``moment`` in ``zone`` (``day_keys`` of its local day)."""
    return day_keys(moment.astimezone(zone))


#: The years a period may name: those of the events (models.schemas.common: EARLIEST, LATEST).
#: At the calendar's ends a period's first or last moment would not exist in UTC.
PERIOD_YEARS = range(2, 9999)


def period_dates(period: str) -> tuple[date, date]:
    """First and last calendar day of ``2026-W48`` or ``2026-11``; ``ValueError`` for what is
    not a period of the years 2 to 9998."""
    match = WEEK_RE.match(period) or MONTH_RE.match(period)
    if match is None:
        raise ValueError(f"a period is 2026-W48 or 2026-11, got {period!r}")
    if int(match[1]) not in PERIOD_YEARS:
        raise ValueError(f"a period of the years 2 to 9998, not {period!r}")
    if match.re is WEEK_RE:
        monday = date.fromisocalendar(int(match[1]), int(match[2]), 1)
        return monday, monday + timedelta(days=6)
    first = date(int(match[1]), int(match[2]), 1)
    following = date(first.year + first.month // 12, first.month % 12 + 1, 1)
    return first, following - timedelta(days=1)


def period_bounds(period: str, zone: ZoneInfo) -> tuple[datetime, datetime]:
    """The half-open UTC interval ``[start, end)`` of a period in the seller's zone."""
    first, last = period_dates(period)
    start = datetime.combine(first, time.min, tzinfo=zone)
    end = datetime.combine(last + timedelta(days=1), time.min, tzinfo=zone)
    return start.astimezone(UTC), end.astimezone(UTC)


def period_kind(period: str) -> str:
    return "weekly" if WEEK_RE.match(period) else "monthly"


def validate_period(period: str) -> str:
    period_dates(period)
    return period


def view_moment(period: str | None, zone: ZoneInfo, now: datetime | None = None) -> datetime:
    """The moment a view is computed at: now, or the last moment of a past ``period`` (the
    first moment of one to come); ``ValueError`` for what is not a period."""
    now = now or datetime.now(UTC)
    if not period:
        return now
    validate_period(period)
    start, end = period_bounds(period, zone)
    if now >= end:
        return end - timedelta(microseconds=1)
    return max(now, start)
