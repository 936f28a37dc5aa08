"""Reports: each manager's targets vs actuals for the period just closed and the current one.

``crm.reports.targets(kind)`` runs on every beat tick (every 15 minutes) and sends each manager
the reports that are due in the manager's own time zone (by default weekly on Monday 07:00 and
monthly on the 1st at 07:00, ``CRM_WEEKLY_REPORT_AT`` / ``CRM_MONTHLY_REPORT_AT``). At most one
report goes out per (manager, kind, period): the ``report_run`` row is claimed before sending,
whatever duplicate beat ticks, retries or a second worker do. A refused or failed send is
recorded on that row and retried with backoff; after the retries it is recorded as a failed
task and the next tick tries again.
"""

from __future__ import annotations

import csv
import io
import logging
import re
import smtplib
import ssl
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from jinja2 import Environment, PackageLoader, select_autoescape
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Settings, report_schedule
from models.base import utcnow
from models.db import transaction, upsert_insert
from models.parties import Staff
from models.targets import ReportRun
from tasks.attach import sanitise_filename
from tasks.errors import TRANSIENT_ERRORS, BadInput
from tasks.periods import day_keys, period_dates, period_keys, period_kind, validate_period
from tasks.views import progress_rows, target_categories, zone_of

log = logging.getLogger(__name__)

CSV_COLUMNS = (
    "period",
    "seller",
    "seller_name",
    "category",
    "target",
    "actual",
    "expected_by_now",
    "pace",
)
#: Sending a report failed in a way worth retrying: SMTP trouble or any transient error.
REPORT_SEND_ERRORS: tuple[type[BaseException], ...] = (
    smtplib.SMTPException,
    ssl.SSLError,
    *TRANSIENT_ERRORS,
)
KINDS = ("weekly", "monthly")


@dataclass
class TargetReport:
    manager: str
    manager_name: str
    manager_email: str | None
    kind: str
    period: str
    current_period: str
    generated_at: datetime
    zone: ZoneInfo
    rows: list[dict[str, Any]]
    csv_text: str
    chart_png: bytes

    @property
    def stem(self) -> str:
        """The files' name: the manager's username comes from master data, never a path."""
        manager = sanitise_filename(re.sub(r"[/\\]", "_", self.manager), fallback="manager")
        return f"targets-{self.kind}-{self.period}-{manager}"

    def html(self, chart_src: str) -> str:
        return render_html(self, chart_src)


# -- when ---------------------------------------------------------------------------------------


def previous_period(period: str) -> str:
    first, _ = period_dates(period)
    if period_kind(period) == "weekly":
        return day_keys(first - timedelta(days=7))[0]
    return day_keys(first - timedelta(days=1))[1]


def current_period(kind: str, now: datetime, zone: ZoneInfo) -> str:
    week, month = period_keys(now, zone)
    return week if kind == "weekly" else month


def closed_period(kind: str, now: datetime, zone: ZoneInfo) -> tuple[str, str]:
    """(the period just closed, the current period) at ``now`` in ``zone``."""
    current = current_period(kind, now, zone)
    return previous_period(current), current


def send_time(kind: str, period: str, zone: ZoneInfo, settings: Settings) -> datetime | None:
    """When, within ``period``, the report of the period before it is due (None: never)."""
    schedule = report_schedule(
        settings.weekly_report_at if kind == "weekly" else settings.monthly_report_at, kind
    )
    if schedule is None:
        return None
    day, hour, minute = schedule
    first, _ = period_dates(period)
    send_day = first + timedelta(days=day) if kind == "weekly" else first.replace(day=day)
    return datetime.combine(send_day, time(hour, minute), tzinfo=zone)


def due_period(kind: str, now: datetime, zone: ZoneInfo, settings: Settings) -> str | None:
    """The period whose report is due at ``now`` in the manager's ``zone``, if any.

    Once the send time of the current period has passed (Monday 07:00, the 1st at 07:00), the
    period just closed is due, for the rest of the current period: a tick missed while beat was
    down is caught up by the next one, and the claim makes every later tick a no-op.
    """
    current = current_period(kind, now, zone)
    moment = send_time(kind, current, zone, settings)
    if moment is None or now < moment:
        return None
    return previous_period(current)


# -- what ---------------------------------------------------------------------------------------


def manager_sellers(session: Session, manager: Staff) -> list[Staff]:
    return list(
        session.scalars(
            select(Staff)
            .where(Staff.manager_id == manager.id, Staff.active.is_(True))
            .order_by(Staff.username)
        )
    )


def build_target_report(
    session: Session,
    manager: Staff,
    kind: str,
    period: str | None = None,
    now: datetime | None = None,
) -> TargetReport:
    """The report of ``period`` (default: the one just closed) and the current period so far."""
    now = now or utcnow()
    zone = zone_of(manager)
    closed, current = closed_period(kind, now, zone)
    period = period or closed
    if period_kind(period) != kind:
        raise BadInput(f"{period} is not a {kind} period")
    periods = list(dict.fromkeys([period, current]))
    rows = progress_rows(
        session,
        manager_sellers(session, manager),
        target_categories(session),
        lambda _seller: periods,
        now,
    )
    rows.sort(key=lambda r: (periods.index(r["period"]), r["seller"], r["category"]))
    buffer = io.StringIO()
    writer = csv.DictWriter(
        buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\r\n"
    )
    writer.writeheader()
    writer.writerows(rows)
    return TargetReport(
        manager=manager.username,
        manager_name=manager.name,
        manager_email=manager.email,
        kind=kind,
        period=period,
        current_period=current,
        generated_at=now,
        zone=zone,
        rows=rows,
        csv_text=buffer.getvalue(),
        chart_png=chart_png(rows, periods),
    )


def team_totals(rows: list[dict[str, Any]], period: str) -> list[dict[str, Any]]:
    """Per category, the team's target against what the sellers with a target did: the sums of
    their targets, actuals and expected-by-now, how many of them there are and how many are
    behind; what sellers without a target did is counted apart (``actual_untargeted``). With
    no target in the category, target, expected and the targeted actual are None."""
    totals: dict[str, dict[str, Any]] = defaultdict(
        lambda: {
            "target": None,
            "actual": None,
            "expected": None,
            "behind": 0,
            "sellers": 0,
            "actual_untargeted": 0,
        }
    )
    names: dict[str, str] = {}
    for row in rows:
        if row["period"] != period:
            continue
        total = totals[row["category"]]
        names[row["category"]] = row["category_name"]
        if row["target"] is None:
            total["actual_untargeted"] += row["actual"]
            continue
        total["sellers"] += 1
        total["target"] = (total["target"] or 0) + row["target"]
        total["actual"] = (total["actual"] or 0) + row["actual"]
        total["expected"] = (total["expected"] or 0.0) + (row["expected_by_now"] or 0.0)
        if row["pace"] == "behind":
            total["behind"] += 1
    return [{"category": code, "name": names[code], **totals[code]} for code in names]


def sellers_behind(count: int, between: str = " / ") -> str:
    """``2 myyjää jäljessä / 2 sellers behind``: people, not events."""
    finnish = "myyjä jäljessä" if count == 1 else "myyjää jäljessä"
    english = "seller behind" if count == 1 else "sellers behind"
    return f"{count} {finnish}{between}{count} {english}"


def number(value: float | None) -> str:
    """A figure as a Finnish reader writes it (1,2); – for none."""
    from babel.numbers import format_decimal

    return "–" if value is None else format_decimal(value, format="#,##0.#", locale="fi_FI")


#: The pace words of the report, in both of its languages.
PACE_WORDS = {"behind": "jäljessä / behind", "on track": "tahdissa / on track"}


def chart_png(rows: list[dict[str, Any]], periods: list[str]) -> bytes:
    """Team target vs actual per category, one panel per period (matplotlib, Agg, PNG).

    Team totals keep the chart readable for any team size; the table has each seller. The
    closed period expects its whole target; the current one the pro-rata share so far.
    """
    # The object-oriented API with the Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    categories = max((len(team_totals(rows, p)) for p in periods), default=1)
    # Wide enough for the legend's three entries even with one panel.
    width_in = max(6.5, max(4.0, 1.5 * categories) * len(periods))
    figure = Figure(figsize=(width_in, 3.8), dpi=100)
    FigureCanvasAgg(figure)
    # Fixed margins: an automatic layout engine costs more than the drawing itself.
    figure.subplots_adjust(left=0.06, right=0.98, top=0.8, bottom=0.14, wspace=0.15)
    axes = figure.subplots(1, len(periods), squeeze=False)[0]
    width = 0.27
    for index, (ax, period) in enumerate(zip(axes, periods, strict=True)):
        totals = team_totals(rows, period)
        positions = list(range(len(totals)))
        series = [
            ("Tavoite / target", [t["target"] or 0 for t in totals], "#9e9e9e", -width),
            (
                "Odotettu nyt / expected by now",
                [t["expected"] or 0.0 for t in totals],
                "#90caf9",
                0.0,
            ),
            ("Toteuma / actual", [t["actual"] or 0 for t in totals], "#1565c0", width),
        ]
        for label, values, colour, offset in series:
            bars = ax.bar([p + offset for p in positions], values, width, label=label, color=colour)
        ax.bar_label(
            bars,
            labels=[sellers_behind(t["behind"], "\n") if t["behind"] else "" for t in totals],
            fontsize=7,
            color="#b00020",
        )
        ax.set_xticks(positions, [t["name"] for t in totals], fontsize=8)
        closed = index < len(periods) - 1  # the last panel is the current period
        ax.set_title(("Päättynyt / closed " if closed else "Kuluva / so far ") + period, fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts: no 0.5 events
        ax.margins(y=0.15)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="upper center", ncols=3, fontsize=8, frameon=False)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _environment() -> Environment:
    environment = Environment(
        loader=PackageLoader("workers", "templates"), autoescape=select_autoescape()
    )
    environment.filters["number"] = number
    environment.globals.update(pace_words=PACE_WORDS, sellers_behind=sellers_behind)
    return environment


def render_html(report: TargetReport, chart_src: str) -> str:
    """The report as HTML; ``chart_src`` is ``cid:…`` in the email, the PNG's name in a file."""
    sections = [("Päättynyt jakso / Period closed", report.period)]
    if report.current_period != report.period:
        sections.append(("Kuluva jakso / Current period so far", report.current_period))
    return (
        _environment()
        .get_template("target_report.html.j2")
        .render(
            manager_name=report.manager_name,
            period=report.period,
            kind_label=(
                "viikkoraportti / weekly report"
                if report.kind == "weekly"
                else "kuukausiraportti / monthly report"
            ),
            generated_at=report.generated_at.astimezone(report.zone).strftime("%Y-%m-%d %H:%M %Z"),
            sections=[
                {
                    "title": title,
                    "period": period,
                    "rows": [r for r in report.rows if r["period"] == period],
                    "totals": team_totals(report.rows, period),
                }
                for title, period in sections
            ],
            chart_src=chart_src,
        )
    )


def write_report_files(report: TargetReport, out_dir: Path) -> list[Path]:
    """The same report as files: HTML (showing the PNG next to it), PNG and CSV."""
    out_dir.mkdir(parents=True, exist_ok=True)
    html_path = out_dir / f"{report.stem}.html"
    png_path = out_dir / f"{report.stem}.png"
    csv_path = out_dir / f"{report.stem}.csv"
    png_path.write_bytes(report.chart_png)
    csv_path.write_text(report.csv_text, encoding="utf-8", newline="")
    html_path.write_text(report.html(png_path.name), encoding="utf-8")
    return [html_path, png_path, csv_path]


# -- sending ------------------------------------------------------------------------------------


def report_email(report: TargetReport, settings: Settings) -> EmailMessage:
    """multipart/mixed: (text | related(HTML, inline chart PNG by Content-ID)) and the CSV."""
    domain = settings.report_from.rpartition("@")[2] or "crm-events"
    message = EmailMessage()
    message["Subject"] = f"Myynnin tavoitteet / Sales targets {report.period} ({report.kind})"
    message["From"] = settings.report_from
    message["To"] = report.manager_email or ""
    message["Date"] = formatdate(report.generated_at.timestamp(), localtime=False)
    # One Message-ID per (manager, kind, period): a mail system can spot a copy.
    message["Message-ID"] = f"<targets.{report.kind}.{report.period}.{report.manager}@{domain}>"
    message.set_content(
        f"Myynnin tavoitteet ja toteumat {report.period}; katso HTML-osa ja CSV-liite.\n"
        f"Sales targets vs actuals for {report.period}; see the HTML part and the CSV attachment.\n"
    )
    chart_id = make_msgid(idstring="chart", domain=domain)
    message.add_alternative(report.html(f"cid:{chart_id[1:-1]}"), subtype="html")
    html_part = message.get_body(preferencelist=("html",))
    assert isinstance(html_part, EmailMessage)
    html_part.add_related(
        report.chart_png,
        maintype="image",
        subtype="png",
        cid=chart_id,
        filename=f"{report.stem}.png",
        disposition="inline",
    )
    message.add_attachment(
        report.csv_text.encode("utf-8"),
        maintype="text",
        subtype="csv",
        filename=f"{report.stem}.csv",
    )
    return message


def send_email(message: EmailMessage, settings: Settings) -> None:
    """Send over SMTP; STARTTLS verifies the server (system CAs or ``CRM_SMTP_CA_FILE``)."""
    with smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=30) as smtp:
        if settings.smtp_starttls:
            context = ssl.create_default_context(
                cafile=str(settings.smtp_ca_file) if settings.smtp_ca_file else None
            )
            smtp.starttls(context=context)
        if settings.smtp_user:
            smtp.login(settings.smtp_user, settings.smtp_password)
        smtp.send_message(message)


def claim_report(
    session: Session,
    manager_id: int,
    kind: str,
    period: str,
    *,
    now: datetime | None = None,
    abandoned_after: timedelta = timedelta(hours=1),
) -> bool:
    """True when this caller may send the report: never tried, failed, or its claim abandoned.

    The INSERT … ON CONFLICT and the conditional UPDATE each let exactly one of several
    concurrent callers through. A claim older than ``abandoned_after`` (longer than a task
    may run) belongs to a worker that was killed mid-send and may be taken again.
    """
    now = now or utcnow()
    inserted = session.execute(
        upsert_insert(session, ReportRun.__table__)
        .values(
            manager_id=manager_id,
            kind=kind,
            period=period,
            state="claimed",
            detail="",
            attempts=1,
            created_at=now,
            claimed_at=now,
        )
        .on_conflict_do_nothing(index_elements=["manager_id", "kind", "period"])
        .returning(ReportRun.id)
    ).scalar()
    if inserted is not None:
        return True
    reclaimed = session.execute(
        update(ReportRun)
        .where(
            ReportRun.manager_id == manager_id,
            ReportRun.kind == kind,
            ReportRun.period == period,
            or_(
                ReportRun.state == "failed",
                (ReportRun.state == "claimed") & (ReportRun.claimed_at < now - abandoned_after),
            ),
        )
        .values(state="claimed", claimed_at=now, attempts=ReportRun.attempts + 1)
        .returning(ReportRun.id)
    ).scalar()
    return reclaimed is not None


def finish_report(
    session: Session, manager_id: int, kind: str, period: str, state: str, detail: str = ""
) -> None:
    """Record the outcome; a report sent after a failed attempt keeps that attempt's error."""
    values: dict[str, Any] = {"state": state, "sent_at": utcnow() if state == "sent" else None}
    if state != "sent" or detail:
        values["detail"] = detail[:2000]
    session.execute(
        update(ReportRun)
        .where(
            ReportRun.manager_id == manager_id, ReportRun.kind == kind, ReportRun.period == period
        )
        .values(**values)
    )


def send_report_once(
    sessions: sessionmaker[Session],
    settings: Settings,
    manager: Staff,
    kind: str,
    period: str,
    now: datetime | None = None,
) -> str:
    """Claim, build, send and record one report: ``sent`` or ``skipped`` (already claimed).

    A failed send is recorded on the claim (state ``failed`` with the error) and re-raised, so
    that the caller retries it; the next claim then takes it again.
    """
    now = now or utcnow()
    with transaction(sessions) as session:
        claimed = claim_report(
            session,
            manager.id,
            kind,
            period,
            now=now,
            abandoned_after=timedelta(seconds=settings.task_time_limit_s + 60),
        )
    if not claimed:
        return "skipped"
    try:
        with sessions() as session:
            report = build_target_report(session, manager, kind, period, now)
        send_email(report_email(report, settings), settings)
    except BaseException as exc:
        with transaction(sessions) as session:
            finish_report(
                session, manager.id, kind, period, "failed", f"{type(exc).__name__}: {exc}"
            )
        raise
    with transaction(sessions) as session:
        finish_report(session, manager.id, kind, period, "sent")
    log.info("target report %s %s sent to %s", kind, period, manager.username)
    return "sent"


@dataclass
class ReportOutcome:
    sent: list[str]
    skipped: list[str]
    failed: list[tuple[str, BaseException]]


def send_due_reports(
    sessions: sessionmaker[Session],
    settings: Settings,
    kind: str,
    *,
    period: str | None = None,
    manager: str | None = None,
    now: datetime | None = None,
) -> ReportOutcome:
    """Send every manager (or one) the report of ``period``, or the one due in their zone."""
    if kind not in KINDS:
        raise BadInput(f"a report is weekly or monthly, not {kind!r}")
    if period is not None:
        try:
            validate_period(period)
        except ValueError as exc:
            raise BadInput(str(exc)) from exc
        if period_kind(period) != kind:
            raise BadInput(f"{period} is not a {kind} period")
    now = now or utcnow()
    with sessions() as session:
        query = select(Staff).where(Staff.role == "manager", Staff.active.is_(True))
        if manager:
            query = select(Staff).where(Staff.username == manager)
        managers = list(session.scalars(query.order_by(Staff.username)))
    outcome = ReportOutcome([], [], [])
    for person in managers:
        wanted = period or due_period(kind, now, zone_of(person), settings)
        if wanted is None:
            continue
        if not person.email:
            log.warning("manager %s has no email address: no %s report", person.username, kind)
            continue
        label = f"{person.username} {kind} {wanted}"
        try:
            result = send_report_once(sessions, settings, person, kind, wanted, now)
        except REPORT_SEND_ERRORS as exc:
            log.warning("target report %s not sent: %s", label, exc)
            outcome.failed.append((label, exc))
            continue
        (outcome.sent if result == "sent" else outcome.skipped).append(label)
    return outcome
