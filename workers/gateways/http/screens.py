"""The screens: Myyjän näkymä (a seller's cards), the manager's board, a customer's history and
the triage list, rendered on the server (Jinja2), readable without JavaScript, live with it.

Every screen answers from the query functions of ``tasks/`` that the API and the command line
use. Times and numbers are shown in the seller's time zone (the board's and triage's in the
configured one) in Finnish, or English (``?lang=en``, remembered), through Babel. A small script
of ours (``static/live.js``) listens to the seller's (or the team's) event stream and reloads
the cards' part of the page when they change; without it the page is whole all the same.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import date, datetime, timedelta
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

from babel.dates import format_date, format_datetime
from babel.numbers import format_decimal
from markupsafe import Markup
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from models.base import utcnow
from models.db import snapshot, transaction
from models.parties import Customer, Staff
from models.targets import Tally
from tasks.access import Principal
from tasks.history import customer_history
from tasks.periods import period_bounds, period_keys, validate_period
from tasks.triage import LinkError, link_by_hand, triage_rows
from tasks.views import (
    events_json,
    progress_rows,
    seller_cards,
    staff_by_username,
    target_categories,
    zone_of,
)
from tasks.work import seller_tasks
from workers.gateways.http.api import moment_of
from workers.gateways.http.auth import check_csrf, identify
from workers.gateways.http.limits import Problem, form_fields, read_body
from workers.gateways.http.pages import language, login_form, path_segment, render, service_of

#: Events of a customer's history per page.
HISTORY_PAGE = 25
#: Weeks in the board's trend.
TREND_WEEKS = 8


#: Words for the codes a screen shows: (Finnish, English).
WORDS: dict[str, tuple[str, str]] = {
    # statuses of calls, mails and visits, and the CRM statuses (models.schemas.common.STATES)
    "ringing": ("soi", "ringing"),
    "answered": ("vastattu", "answered"),
    "completed": ("päättynyt", "completed"),
    "missed": ("vastaamaton", "missed"),
    "busy": ("varattu", "busy"),
    "failed": ("epäonnistui", "failed"),
    "voicemail": ("vastaaja", "voicemail"),
    "received": ("vastaanotettu", "received"),
    "done": ("valmis", "done"),
    "cancelled": ("peruttu", "cancelled"),
    "scheduled": ("sovittu", "scheduled"),
    "open": ("kesken", "open"),
    # where an event came from, how it is linked
    "call": ("puhelu", "call"),
    "email": ("sähköposti", "email"),
    "visit": ("käynti", "visit"),
    "meeting": ("neuvottelu", "meeting"),
    "linked": ("kohdistettu", "linked"),
    "unlinked": ("kohdistamaton", "unlinked"),
    "ambiguous": ("monitulkintainen", "ambiguous"),
    # what matching tried
    "numbers": ("numerot", "numbers"),
    "addresses": ("osoitteet", "addresses"),
    "domains": ("verkkotunnukset", "domains"),
    "customer_numbers": ("asiakasnumerot", "customer numbers"),
}


class Formats:
    """Dates, times, numbers and codes as people of one language read them, in one zone."""

    def __init__(self, lang: str, zone: ZoneInfo, names: dict[str, tuple[str, str]] | None = None):
        self.lang = lang
        self.locale = "fi_FI" if lang == "fi" else "en_GB"
        self.zone = zone
        #: Catalogue codes (categories, classes, types, properties) and their names.
        self.names = names or {}

    def word(self, code: str | None) -> str:
        """A code's name in the language (a catalogue name, a status), else the code."""
        if not code:
            return ""
        pair = self.names.get(code) or WORDS.get(code)
        return (pair[0] if self.lang == "fi" else pair[1]) if pair else code

    def when(self, value: str | datetime | None) -> str:
        if not value:
            return ""
        moment = datetime.fromisoformat(value) if isinstance(value, str) else value
        return format_datetime(moment, "short", tzinfo=self.zone, locale=self.locale)

    def day(self, value: str | date | datetime) -> str:
        day = date.fromisoformat(value) if isinstance(value, str) else value
        return format_date(day, "medium", locale=self.locale)

    def number(self, value: float | int | None) -> str:
        return "–" if value is None else format_decimal(value, locale=self.locale)

    def month(self, period: str) -> str:
        first, _ = period_bounds(period, self.zone)
        return format_date(first.astimezone(self.zone), "LLLL yyyy", locale=self.locale)

    def period(self, period: str) -> str:
        if "W" in period:
            year, week = period.split("-W")
            return f"{'viikko' if self.locale == 'fi_FI' else 'week'} {int(week)}/{year}"
        return self.month(period)


def catalogue_names(service: Any) -> dict[str, tuple[str, str]]:
    """Every catalogue code's names (Finnish, English): small, read per page."""
    from models.catalogue import Category, EventClass, EventProperty, EventType

    names: dict[str, tuple[str, str]] = {}
    with service.sessions() as session:
        for model in (EventClass, EventType, EventProperty, Category):
            for code, fi, en in session.execute(select(model.code, model.name_fi, model.name_en)):
                names[code] = (fi, en)
    return names


async def formats(request: Request, zone: ZoneInfo) -> Formats:
    names = await run_in_threadpool(catalogue_names, service_of(request))
    return Formats(language(request), zone, names)


async def page_principal(request: Request) -> Principal | Response:
    """The signed-in principal with the read scope, or the answer to give instead: the sign-in
    form (401) without one, a refusal (403) with a token that may not read."""
    principal = await run_in_threadpool(identify, service_of(request), request)
    if principal is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return login_form(request, target, status=401, sign_in_first=True)
    if not principal.may("read"):
        return render(request, "refused.html.j2", status=403, principal=principal)
    return principal


def period_links(zone: ZoneInfo, now: datetime) -> list[tuple[str, str]]:
    """The switcher's choices: this week and month, and the ones before them."""
    week, month = period_keys(now, zone)
    week_start, _ = period_bounds(week, zone)
    month_start, _ = period_bounds(month, zone)
    last_week, _ = period_keys(week_start - timedelta(days=1), zone)
    _, last_month = period_keys(month_start - timedelta(days=1), zone)
    return [("this-week", week), ("this-month", month), ("last-week", last_week),
            ("last-month", last_month)]  # fmt: skip


# -- Myyjän näkymä -------------------------------------------------------------------------------


def seller_view_data(service: Any, username: str, period: str | None) -> dict[str, Any] | None:
    with snapshot(service.sessions) as session:
        staff = staff_by_username(session, username)
        if staff is None:
            return None
        zone = zone_of(staff)
        moment = moment_of(period, zone)
        cards = seller_cards(session, staff, now=moment, cards=service.settings.seller_cards)
        ids = sorted({e["id"] for card in cards for e in card["events"]})
        from models.events import CrmEvent

        rows = events_json(
            session,
            list(session.scalars(select(CrmEvent).where(CrmEvent.id.in_(ids)))),
            zone,
        )
        numbers = {r["customer_number"] for r in rows if r["customer_number"]}
        names = dict(
            session.execute(
                select(Customer.customer_number, Customer.name).where(
                    Customer.customer_number.in_(numbers)
                )
            ).all()
        )
        manager = session.get(Staff, staff.manager_id) if staff.manager_id else None
        tasks = seller_tasks(session, staff, moment.astimezone(zone).date())
        return {
            "tasks": tasks,
            "staff": {"username": staff.username, "name": staff.name, "role": staff.role},
            "manager": manager.username if manager else None,
            "zone": zone,
            "moment": moment,
            "cards": cards,
            "events": {r["id"]: r for r in rows},
            "customers": names,
        }


async def seller_screen(request: Request) -> Response:
    principal = await page_principal(request)
    if isinstance(principal, Response):
        return principal
    username = request.path_params["username"]
    period = request.query_params.get("period") or None
    if period:
        try:
            validate_period(period)
        except ValueError:
            return render(request, "missing.html.j2", status=400, what=period, kind="period")
    data = await run_in_threadpool(seller_view_data, service_of(request), username, period)
    if data is None:
        return render(request, "missing.html.j2", status=404, what=username, kind="seller")
    formats_ = await formats(request, data["zone"])
    query = urlencode({"period": period} if period else {})
    context = {
        **data,
        "f": formats_,
        "period": period,
        "periods": period_links(data["zone"], utcnow()),
        "fragment_url": f"/sellers/{path_segment(username)}?"
        + urlencode({"part": "cards", **dict(request.query_params)}),
        "stream_url": f"/v1/stream/sellers/{path_segment(username)}",
        "query": query,
        "principal": principal,
    }
    if request.query_params.get("part") == "cards":
        return render(request, "seller_cards.html.j2", **context)
    return render(request, "seller.html.j2", **context)


# -- the manager's board -------------------------------------------------------------------------


def board_data(service: Any, manager_name: str | None, principal: Principal) -> dict[str, Any]:
    with service.sessions() as session:
        managers = list(
            session.scalars(select(Staff).where(Staff.role == "manager").order_by(Staff.username))
        )
        wanted = manager_name or principal.staff
        manager = next((m for m in managers if m.username == wanted), None)
        if manager is None and len(managers) == 1:
            manager = managers[0]
        result: dict[str, Any] = {
            "managers": [(m.username, m.name) for m in managers],
            "manager": None,
        }
        if manager is None:
            return result
        zone = zone_of(manager)
        team = list(
            session.scalars(
                select(Staff)
                .where(Staff.manager_id == manager.id, Staff.active.is_(True))
                .order_by(Staff.name)
            )
        )
        categories = target_categories(session)
        now = utcnow()
        rows = progress_rows(
            session, team, categories, lambda staff: list(period_keys(now, zone_of(staff))), now
        )
        # The trend: the tallies of the last weeks, per seller and category.
        weeks: list[str] = []
        moment = now
        for _ in range(TREND_WEEKS):
            week, _month = period_keys(moment, zone)
            weeks.insert(0, week)
            moment -= timedelta(days=7)
        trend: dict[tuple[int, str], dict[str, int]] = defaultdict(dict)
        for seller_id, code, period, count in session.execute(
            select(Tally.seller_id, Tally.category_code, Tally.period, Tally.count).where(
                Tally.seller_id.in_([s.id for s in team]), Tally.period.in_(weeks)
            )
        ):
            trend[(seller_id, code)][period] = count
        by_seller: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
        for row in rows:
            by_seller[row["seller"]].setdefault(row["category"], {})[row["kind"]] = row
        sellers = []
        for staff in team:
            cells: list[dict[str, Any]] = []
            for category in categories:
                found = by_seller[staff.username].get(category.code, {})
                counts = [trend[(staff.id, category.code)].get(w, 0) for w in weeks]
                cells.append(
                    {
                        "category": category.code,
                        "week": found.get("weekly"),
                        "month": found.get("monthly"),
                        "trend": counts,
                    }
                )
            behind = any(
                (c[kind] or {}).get("pace") == "behind" for c in cells for kind in ("week", "month")
            )
            sellers.append(
                {"username": staff.username, "name": staff.name, "cells": cells, "behind": behind}
            )
        result.update(
            manager={"username": manager.username, "name": manager.name},
            zone=zone,
            categories=[(c.code, c.name_fi, c.name_en) for c in categories],
            sellers=sellers,
            weeks=weeks,
        )
        return result


def sparkline(counts: list[int], width: int = 96, height: int = 24) -> Markup:
    """An inline SVG polyline of weekly counts (server-drawn: no script, no library)."""
    top = max(counts) or 1
    step = width / max(1, len(counts) - 1)
    points = " ".join(
        f"{i * step:.1f},{height - 2 - (count / top) * (height - 4):.1f}"
        for i, count in enumerate(counts)
    )
    return Markup(
        f'<svg class="spark" viewBox="0 0 {width} {height}" width="{width}" height="{height}"'
        f' aria-hidden="true" focusable="false"><polyline points="{points}"/></svg>'
    )


async def board_screen(request: Request) -> Response:
    principal = await page_principal(request)
    if isinstance(principal, Response):
        return principal
    data = await run_in_threadpool(
        board_data, service_of(request), request.query_params.get("manager"), principal
    )
    zone = data.get("zone") or service_of(request).settings.zone
    context = {
        **data,
        "f": await formats(request, zone),
        "sparkline": sparkline,
        "now": utcnow(),
        "principal": principal,
        "stream_url": (
            f"/v1/stream/teams/{path_segment(data['manager']['username'])}"
            if data["manager"]
            else ""
        ),
        "fragment_url": f"/board?{urlencode({'part': 'table', **dict(request.query_params)})}",
    }
    if request.query_params.get("part") == "table":
        return render(request, "board_table.html.j2", **context)
    return render(request, "board.html.j2", **context)


# -- a customer's history ------------------------------------------------------------------------


async def customer_screen(request: Request) -> Response:
    principal = await page_principal(request)
    if isinstance(principal, Response):
        return principal
    service = service_of(request)
    number = request.path_params["number"]
    try:
        page = max(1, int(request.query_params.get("page", "1")))
    except ValueError:
        page = 1

    def load() -> dict[str, Any] | None:
        with service.sessions() as session:
            customer = session.scalar(select(Customer).where(Customer.customer_number == number))
            if customer is None:
                return None
            return customer_history(session, customer, service.settings.zone)

    history = await run_in_threadpool(load)
    if history is None:
        return render(request, "missing.html.j2", status=404, what=number, kind="customer")
    events = history["events"]
    pages = max(1, -(-len(events) // HISTORY_PAGE))
    page = min(page, pages)
    shown = events[(page - 1) * HISTORY_PAGE : page * HISTORY_PAGE]
    return render(
        request,
        "customer.html.j2",
        history=history,
        events=shown,
        page=page,
        pages=pages,
        f=await formats(request, service.settings.zone),
        principal=principal,
    )


# -- triage --------------------------------------------------------------------------------------


async def triage_screen(request: Request) -> Response:
    principal = await page_principal(request)
    if isinstance(principal, Response):
        return principal
    service = service_of(request)

    def load() -> list[dict[str, Any]]:
        with service.sessions() as session:
            return triage_rows(session, service.settings.zone, limit=200)

    rows = await run_in_threadpool(load)
    return render(
        request,
        "triage.html.j2",
        rows=rows,
        f=await formats(request, service.settings.zone),
        principal=principal,
        csrf=getattr(request.state, "csrf", None),
        done=request.query_params.get("linked"),
        refused=request.query_params.get("refused"),
    )


async def triage_link(request: Request) -> Response:
    principal = await page_principal(request)
    if isinstance(principal, Response):
        return principal
    if not principal.may("admin"):
        raise Problem(403, f"the token's scope {principal.scope!r} does not allow linking")
    service = service_of(request)
    body = await read_body(request, 16 * 1024)
    form = dict(form_fields(body.decode("utf-8", "replace"), 10))
    check_csrf(request, form.get("csrf"))
    event_id = request.path_params["event_id"]
    customer = form.get("customer", "").strip()
    contact = form.get("contact", "").strip() or None

    def link() -> tuple[set[int], str | None]:
        try:
            with transaction(service.sessions) as session:
                linked = link_by_hand(session, service.settings, event_id, customer, contact)
                return linked.sellers, None
        except LinkError as exc:
            return set(), str(exc)

    sellers, refused = await run_in_threadpool(link)
    if refused is None:
        from workers.base import request_refresh

        for seller_id in sorted(sellers):
            await run_in_threadpool(request_refresh, service.celery, service.sessions, seller_id)
    target = f"/triage?{urlencode({'refused': refused} if refused else {'linked': event_id})}"
    return RedirectResponse(target, status_code=303)


async def home(request: Request) -> Response:
    principal = await run_in_threadpool(identify, service_of(request), request)
    if principal is None:
        return RedirectResponse("/login", status_code=303)
    if principal.staff:

        def role() -> str | None:
            with service_of(request).sessions() as session:
                staff = staff_by_username(session, principal.staff or "")
                return staff.role if staff else None

        if await run_in_threadpool(role) == "manager":
            return RedirectResponse("/board", status_code=303)
        return RedirectResponse(f"/sellers/{path_segment(principal.staff)}", status_code=303)
    return RedirectResponse("/board", status_code=303)


ROUTES = [
    Route("/", home, methods=["GET"]),
    Route("/sellers/{username:name}", seller_screen, methods=["GET"]),
    Route("/board", board_screen, methods=["GET"]),
    Route("/customers/{number:name}", customer_screen, methods=["GET"]),
    Route("/triage", triage_screen, methods=["GET"]),
    Route("/triage/{event_id:id}/link", triage_link, methods=["POST"]),
]
