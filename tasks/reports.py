"""Reports: each manager's targets vs actuals for the period just closed and the current one.

``crm.reports.targets`` (beat) sends at most one report per (manager, kind, period): the
``report_run`` row is claimed before sending, whatever duplicate beat ticks and retries do.
"""

from __future__ import annotations

import csv
import io
import smtplib
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from celery import shared_task
from jinja2 import Environment, PackageLoader, select_autoescape
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from config.settings import Settings
from models.base import utcnow
from models.db import transaction, upsert_insert
from models.parties import Staff
from models.targets import ReportRun
from tasks.errors import TRANSIENT_ERRORS
from tasks.periods import period_keys
from tasks.store import seller_zone
from tasks.views import targets_progress
from workers.base import CrmTask

CSV_COLUMNS = ("period", "seller", "category", "target", "actual", "expected_by_now", "pace")
#: Sending a report failed in a way worth retrying: SMTP trouble or any transient error.
REPORT_SEND_ERRORS: tuple[type[BaseException], ...] = (smtplib.SMTPException, *TRANSIENT_ERRORS)


@dataclass
class TargetReport:
    manager: str
    manager_email: str | None
    kind: str
    period: str
    current_period: str
    rows: list[dict[str, Any]]
    html: str
    csv_text: str


def closed_period(kind: str, now: datetime, zone: Any) -> tuple[str, str]:
    """(the period just closed, the current period) in the manager's zone."""
    week, month = period_keys(now, zone)
    if kind == "weekly":
        return period_keys(now - timedelta(days=7), zone)[0], week
    local = now.astimezone(zone)
    previous = local.replace(day=1) - timedelta(days=1)
    return previous.strftime("%Y-%m"), month


def build_target_report(
    session: Session,
    manager: Staff,
    kind: str,
    period: str | None = None,
    now: datetime | None = None,
) -> TargetReport:
    now = now or utcnow()
    zone = seller_zone(session, manager.id)
    closed, current = closed_period(kind, now, zone)
    period = period or closed
    sellers = session.scalars(
        select(Staff.username)
        .where(Staff.manager_id == manager.id, Staff.active.is_(True))
        .order_by(Staff.username)
    ).all()
    rows: list[dict[str, Any]] = []
    for username in sellers:
        for p in dict.fromkeys([period, current]):
            rows.extend(targets_progress(session, seller=username, period=p, now=now))
    env = Environment(loader=PackageLoader("workers", "templates"), autoescape=select_autoescape())
    html = env.get_template("target_report.html.j2").render(
        manager_name=manager.name,
        kind_label="viikkoraportti / weekly" if kind == "weekly" else "kuukausiraportti / monthly",
        generated_at=now.astimezone(zone).strftime("%Y-%m-%d %H:%M %Z"),
        sections=[
            {
                "title": "Päättynyt jakso / Period closed",
                "period": period,
                "rows": [r for r in rows if r["period"] == period],
            },
            {
                "title": "Kuluva jakso / Current period",
                "period": current,
                "rows": [r for r in rows if r["period"] == current and current != period],
            },
        ],
        chart_cid=None,
    )
    buffer = io.StringIO()
    writer = csv.DictWriter(
        buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n"
    )
    writer.writeheader()
    writer.writerows(rows)
    return TargetReport(
        manager.username, manager.email, kind, period, current, rows, html, buffer.getvalue()
    )


def write_report_files(report: TargetReport, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"targets-{report.kind}-{report.period}-{report.manager}"
    html_path, csv_path = out_dir / f"{stem}.html", out_dir / f"{stem}.csv"
    html_path.write_text(report.html, encoding="utf-8")
    csv_path.write_text(report.csv_text, encoding="utf-8")
    return [html_path, csv_path]


def report_email(report: TargetReport, settings: Settings) -> EmailMessage:
    message = EmailMessage()
    message["Subject"] = f"Myynnin tavoitteet {report.period} ({report.kind})"
    message["From"] = settings.report_from
    message["To"] = report.manager_email or ""
    message.set_content(f"Targets vs actuals for {report.period}; see the HTML part and the CSV.")
    message.add_alternative(report.html, subtype="html")
    message.add_attachment(
        report.csv_text.encode("utf-8"),
        maintype="text",
        subtype="csv",
        filename=f"targets-{report.kind}-{report.period}.csv",
    )
    return message


def send_email(message: EmailMessage, settings: Settings) -> None:
    with smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=30) as smtp:
        if settings.smtp_starttls:
            smtp.starttls()
        if settings.smtp_user:
            smtp.login(settings.smtp_user, settings.smtp_password)
        smtp.send_message(message)


def claim_report(session: Session, manager_id: int, kind: str, period: str) -> bool:
    """True when this caller may send the report (never sent, or an earlier send failed)."""
    inserted = session.execute(
        upsert_insert(session, ReportRun.__table__)
        .values(
            manager_id=manager_id,
            kind=kind,
            period=period,
            state="claimed",
            detail="",
            created_at=utcnow(),
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
            ReportRun.state == "failed",
        )
        .values(state="claimed")
        .returning(ReportRun.id)
    ).scalar()
    return reclaimed is not None


def finish_report(
    session: Session, manager_id: int, kind: str, period: str, state: str, detail: str = ""
) -> None:
    session.execute(
        update(ReportRun)
        .where(
            ReportRun.manager_id == manager_id, ReportRun.kind == kind, ReportRun.period == period
        )
        .values(state=state, detail=detail[:2000], sent_at=utcnow() if state == "sent" else None)
    )


@shared_task(name="crm.reports.targets", base=CrmTask, bind=True)
def send_target_reports_task(self: CrmTask, kind: str) -> str:
    """crm.reports.targets: send every manager the report of the period just closed, once."""
    settings = self.settings
    with transaction(self.sessions) as session:
        managers = session.scalars(
            select(Staff).where(Staff.role == "manager", Staff.active.is_(True))
        ).all()
    sent = 0
    for manager in managers:
        with transaction(self.sessions) as session:
            report = build_target_report(session, manager, kind)
            if not manager.email or not claim_report(session, manager.id, kind, report.period):
                continue
        try:
            send_email(report_email(report, settings), settings)
        except REPORT_SEND_ERRORS as exc:
            with transaction(self.sessions) as session:
                finish_report(session, manager.id, kind, report.period, "failed", repr(exc))
            self.retry_or_record({"kind": kind, "manager": manager.username}, exc)
            continue
        with transaction(self.sessions) as session:
            finish_report(session, manager.id, kind, report.period, "sent")
        sent += 1
    return f"sent {sent}"
