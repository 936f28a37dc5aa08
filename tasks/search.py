"""The events search: one set of filters and one ordering, for the command line and the HTTP API.

Events come newest first, by ``(occurred_at, id)``. A page ends with a cursor, the position of
its last event; the next page starts strictly after it. Keyset pagination neither skips nor
repeats an event while others are stored: a new event sorts before the first page or after
the position already read, never into a page already given.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
from dataclasses import dataclass, fields, replace
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Select, and_, or_, select
from sqlalchemy.orm import Session

from models.catalogue import Category, EventClass, EventProperty, EventType
from models.events import STATES, CrmEvent, EventPropertyLink, sent_by
from models.invalid import BadInput
from models.limits import MAX_ROW_ID
from models.parties import Customer, Staff
from tasks.views import known_staff

#: The largest page one request may ask for.
MAX_LIMIT = 1000


@dataclass(frozen=True)
class EventFilters:
    """Every filter the search knows; ``None`` (or False) leaves it out."""

    customer: str | None = None
    seller: str | None = None
    class_: str | None = None
    type: str | None = None
    category: str | None = None
    property: str | None = None
    source: str | None = None
    source_kind: str | None = None
    since: date | None = None
    until: date | None = None
    text: str | None = None
    thread: str | None = None
    project: str | None = None
    offer: str | None = None
    state: str | None = None
    unlinked: bool = False

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


#: The days a search may start or end on: those events may have (models.schemas.common:
#: EARLIEST, LATEST), away from the calendar's ends, where a day's first moment in a zone is
#: not a time in UTC. Not imported from there: a listing loads no message schema.
SEARCH_DAYS = (date(2, 1, 1), date(9998, 12, 31))
#: Words of a text search: each is two conditions of the query, and a query of thousands of
#: them is more than a database takes (SQLite's expression tree stops at 1,000 levels).
MAX_SEARCH_WORDS = 32


def parse_day(text: str) -> date:
    """A day of the search (YYYY-MM-DD, of the years 2 to 9998); :class:`BadInput` otherwise."""
    try:
        day = date.fromisoformat(text)
    except ValueError as exc:
        raise BadInput(f"not a date (YYYY-MM-DD): {text[:40]!r}") from exc
    if not SEARCH_DAYS[0] <= day <= SEARCH_DAYS[1]:
        raise BadInput(f"not a date of the years 2 to 9998: {text[:40]!r}")
    return day


def _day_start(day: date, zone: ZoneInfo) -> datetime:
    return datetime.combine(day, time.min, tzinfo=zone)


@functools.cache
def _finnish() -> Any:
    import snowballstemmer

    return snowballstemmer.stemmer("finnish")


def search_stems(text: str) -> list[str]:
    """The words of a text search as the stems to look for: Snowball's Finnish stem of each
    word (the stemmer of PostgreSQL's ``finnish`` configuration), less the -s/-ks- of the
    nouns that alternate (``sopimus``, ``sopimuksen``: ``sopimu``), so that every inflected
    form of the word, and a compound that contains it, holds the stem.

    ``huoltosopimus`` and ``huoltosopimuksen`` both become ``huoltosopimu``; ``E4711`` stays
    ``e4711``; ``2026-118`` is ``2026`` and ``118``.
    """
    words = re.findall(r"\w+", text.casefold())
    stems = []
    for word, stem in zip(words, _finnish().stemWords(words), strict=True):
        if not word.startswith(stem):  # the stemmer changed a letter: keep what it shares
            pairs = zip(word, stem, strict=False)
            stem = word[: next((i for i, (a, b) in enumerate(pairs) if a != b), len(stem))]
        if stem.endswith("ks") and len(stem) >= 7:
            stem = stem[:-2]
        elif stem.endswith("s") and len(stem) >= 6:
            stem = stem[:-1]
        stems.append(stem or word)
    # A letter alone (the "s" of "Oy:ssä") would match every text: left out if anything else is.
    kept = [stem for stem in stems if len(stem) > 1] or stems
    return list(dict.fromkeys(kept))


def events_query(filters: EventFilters, zone: ZoneInfo) -> Select[Any]:
    """The filtered events, newest first (no limit). Days are read in ``zone``."""
    query = select(CrmEvent)
    if filters.customer:
        query = query.join(Customer, Customer.id == CrmEvent.customer_id).where(
            Customer.customer_number == filters.customer
        )
    if filters.seller:
        query = query.join(Staff, Staff.id == CrmEvent.seller_id).where(
            Staff.username == filters.seller
        )
    for value, column in (
        (filters.class_, CrmEvent.class_code),
        (filters.type, CrmEvent.type_code),
        (filters.category, CrmEvent.category_code),
        (filters.source_kind, CrmEvent.source_kind),
        (filters.thread, CrmEvent.thread_key),
        (filters.project, CrmEvent.project_number),
        (filters.offer, CrmEvent.offer_number),
        (filters.state, CrmEvent.state),
    ):
        if value:
            query = query.where(column == value)
    if filters.source:
        query = query.where(sent_by(filters.source))
    if filters.property:
        query = query.where(
            CrmEvent.id.in_(
                select(EventPropertyLink.event_id).where(
                    EventPropertyLink.property_code == filters.property
                )
            )
        )
    if filters.since:
        query = query.where(CrmEvent.occurred_at >= _day_start(filters.since, zone))
    if filters.until:
        query = query.where(
            CrmEvent.occurred_at < _day_start(filters.until + timedelta(days=1), zone)
        )
    if filters.text:
        # Each word's stem anywhere in the subject or the memo (ILIKE: served by the pg_trgm GIN
        # indexes on PostgreSQL), every word: docs/design.md, "Finnish text search".
        for stem in search_stems(filters.text):
            escaped = stem.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            pattern = f"%{escaped}%"
            query = query.where(
                CrmEvent.subject.ilike(pattern, escape="\\")
                | CrmEvent.body.ilike(pattern, escape="\\")
            )
    if filters.unlinked:
        query = query.where(CrmEvent.link_state.in_(("unlinked", "ambiguous")))
    return query.order_by(CrmEvent.occurred_at.desc(), CrmEvent.id.desc())


@dataclass(frozen=True)
class Page:
    events: list[CrmEvent]
    #: Where the next page starts, or None after the last one.
    next: str | None


def encode_cursor(event: CrmEvent) -> str:
    text = f"{event.occurred_at.isoformat()}|{event.id}"
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, int]:
    """The event a page ended on (its time and id), as :func:`encode_cursor` wrote it;
    :class:`BadInput` for anything else (a time without its offset or that is no time in UTC,
    an id no database keeps)."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        moment, _, number = text.partition("|")
        when, event_id = datetime.fromisoformat(moment), int(number)
        if when.tzinfo is None or not 0 <= event_id <= MAX_ROW_ID:
            raise ValueError("not a cursor")
        when.astimezone(UTC)
    except (binascii.Error, UnicodeDecodeError, ValueError, OverflowError) as exc:
        raise BadInput("not a cursor of this search: start again without one") from exc
    return when, event_id


def search_events(
    session: Session,
    filters: EventFilters,
    zone: ZoneInfo,
    *,
    limit: int,
    cursor: str | None = None,
) -> Page:
    """One page of the search: at most ``limit`` events after ``cursor``."""
    if not 0 < limit <= MAX_LIMIT:
        raise BadInput(f"limit must be from 1 to {MAX_LIMIT}")
    query = events_query(resolve_filters(session, filters), zone)
    if cursor:
        moment, number = decode_cursor(cursor)
        query = query.where(
            or_(
                CrmEvent.occurred_at < moment,
                and_(CrmEvent.occurred_at == moment, CrmEvent.id < number),
            )
        )
    found = list(session.scalars(query.limit(limit + 1)))
    events = found[:limit]
    more = len(found) > limit
    return Page(events, encode_cursor(events[-1]) if more and events else None)


#: Filters by the catalogue: (field, what it is called, its table).
CATALOGUE_FILTERS = (
    ("class_", "class", EventClass),
    ("type", "type", EventType),
    ("category", "category", Category),
    ("property", "property", EventProperty),
)


def resolve_filters(session: Session, filters: EventFilters) -> EventFilters:
    """The filters with the catalogue's codes, checked: a class, type, category or property may
    be named by its code or its Finnish or English name (any case: ``Myynti``, ``sales``); a
    seller, customer or catalogue value that does not exist is bad input that says what
    there is, never a search that silently finds nothing."""
    codes: dict[str, Any] = {}
    for name, label, model in CATALOGUE_FILTERS:
        wanted = getattr(filters, name)
        if not wanted:
            continue
        rows = session.execute(select(model.code, model.name_fi, model.name_en)).all()
        key = wanted.strip().casefold()
        code = next(
            (
                r.code
                for r in rows
                if key in (r.code.casefold(), r.name_fi.casefold(), r.name_en.casefold())
            ),
            None,
        )
        if code is None:
            known = ", ".join(f"{r.code} ({r.name_fi})" for r in sorted(rows))
            raise BadInput(f"no {label} {wanted!r}: the {label} is one of {known}")
        codes[name] = code
    if filters.seller:
        known_staff(session, filters.seller)
    if (
        filters.customer
        and session.scalar(select(Customer.id).where(Customer.customer_number == filters.customer))
        is None
    ):
        raise BadInput(f"no customer with the number {filters.customer!r}")
    if (
        filters.source
        and filters.source.casefold() in EVENT_KINDS
        and session.scalar(select(CrmEvent.id).where(sent_by(filters.source)).limit(1)) is None
    ):
        kind = filters.source.casefold()
        raise BadInput(
            f"no system {filters.source!r} sent any event: --source is the sending system "
            f"(pbx-hki, field-app, the email gateway); for the kind of event: --source-kind {kind}"
        )
    if filters.source_kind and filters.source_kind.strip().casefold() not in EVENT_KINDS:
        raise BadInput(
            f"no kind of event {filters.source_kind[:40]!r}: it is one of {', '.join(EVENT_KINDS)}"
        )
    if filters.source_kind:
        codes["source_kind"] = filters.source_kind.strip().casefold()
    if filters.state:
        key = filters.state.strip().casefold()
        state = next((c for c, fi in STATES.items() if key in (c, fi)), None)
        if state is None:
            known = ", ".join(f"{c} ({fi})" for c, fi in STATES.items())
            raise BadInput(f"no state {filters.state!r}: the state is one of {known}")
        codes["state"] = state
    return replace(filters, **codes)


#: What ``source_kind`` may be; a ``source`` of one of these is most likely meant as a kind.
EVENT_KINDS = ("call", "email", "visit", "meeting")


def filters_from(values: dict[str, Any]) -> EventFilters:
    """The filters named in ``values`` (a request's query, the command line's arguments)."""
    known: dict[str, Any] = {
        name: values[name] for name in EventFilters.names() if values.get(name)
    }
    for name in ("since", "until"):
        if isinstance(known.get(name), str):
            known[name] = parse_day(known[name])
    if isinstance(known.get("text"), str):
        words = len(search_stems(known["text"]))
        if words > MAX_SEARCH_WORDS:
            raise BadInput(f"a text search of at most {MAX_SEARCH_WORDS} words")
        if not words:  # '%' or '!!!': no letter or digit, and a search for nothing finds all
            raise BadInput(f"the text {known['text'][:40]!r} has no word to look for")
    if "unlinked" in known:
        known["unlinked"] = str(known["unlinked"]).lower() in ("1", "true", "yes", "on")
    return EventFilters(**known)
