"""Managers' target reports sent to a real SMTP server on loopback, read back as MIME."""

from __future__ import annotations

import csv
import dataclasses
import io
import re
import subprocess
from collections.abc import Iterator
from datetime import date, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Settings
from models.parties import Staff
from models.targets import ReportRun
from tasks.context import StageContext
from tasks.ingest.call import ingest_call
from tasks.refresh import refresh_seller
from tasks.reports import build_target_report, send_due_reports, team_totals, write_report_files
from tasks.targets import set_target
from tests.messages import outbound_call
from tests.smtp_sink import SmtpSink

HELSINKI = ZoneInfo("Europe/Helsinki")
MONDAY_0700 = datetime(2026, 11, 30, 7, 0, tzinfo=HELSINKI)
DECEMBER_1ST_0700 = datetime(2026, 12, 1, 7, 0, tzinfo=HELSINKI)
HELENA = "helena.salo@myyntitalo.fi"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sink() -> Iterator[SmtpSink]:
    server = SmtpSink().start()
    yield server
    server.stop()


@pytest.fixture
def smtp_settings(settings: Settings, sink: SmtpSink) -> Settings:
    sink.reset()
    return dataclasses.replace(settings, smtp_host=sink.host, smtp_port=sink.port)


@pytest.fixture
def sessions(team: Session) -> sessionmaker[Session]:
    """Sessions on the test's connection: their commits are savepoints, rolled back at the end."""
    return sessionmaker(
        bind=team.connection(), join_transaction_mode="create_savepoint", expire_on_commit=False
    )


def sales_call(call_id: str, started_at: str, agent: str = "anna") -> dict[str, Any]:
    return outbound_call(call_id, started_at, agent, category="sales_action")


@pytest.fixture
def team(world: Session, ctx: StageContext) -> Session:
    """helena's sellers anna and mikko with targets (changed mid-month) and sales actions."""
    for day, value in ((date(2026, 11, 2), 5), (date(2026, 11, 18), 8)):  # changed on a Wednesday
        set_target(world, "anna", "sales_action", "weekly", value, day)
    for day, value in ((date(2026, 11, 1), 20), (date(2026, 11, 15), 30)):  # changed mid-month
        set_target(world, "anna", "sales_action", "monthly", value, day)
    set_target(world, "mikko", "sales_action", "weekly", 2, date(2026, 11, 2))
    for call_id, started in (
        ("r-1", "2026-11-11T09:00:00+02:00"),  # W46
        ("r-2", "2026-11-23T09:00:00+02:00"),  # W48
        ("r-3", "2026-11-29T23:30:00+02:00"),  # Sunday night: still W48
        ("r-4", "2026-11-29T22:30:00Z"),  # already Monday in Helsinki: W49
    ):
        assert ingest_call(world, ctx, sales_call(call_id, started)).outcome == "stored"
    for call_id, started in (("m-1", "2026-11-24T10:00:00+02:00"), ("m-2", "2026-11-25T10:00")):
        assert ingest_call(world, ctx, sales_call(call_id, started, "mikko")).outcome == "stored"
    for username in ("anna", "mikko"):
        seller = world.scalar(select(Staff).where(Staff.username == username))
        assert seller is not None
        refresh_seller(world, ctx, seller.id)
    return world


def rows_of(csv_text: str) -> dict[tuple[str, str, str], dict[str, str]]:
    return {
        (r["period"], r["seller"], r["category"]): r for r in csv.DictReader(io.StringIO(csv_text))
    }


def report_run(session: Session, period: str) -> ReportRun:
    run = session.scalar(select(ReportRun).where(ReportRun.period == period))
    assert run is not None
    session.refresh(run)
    return run


def parts(message: EmailMessage) -> tuple[str, EmailMessage, EmailMessage]:
    html_part = message.get_body(preferencelist=("html",))
    assert isinstance(html_part, EmailMessage)
    html = html_part.get_content()
    images = [p for p in message.walk() if p.get_content_type() == "image/png"]
    attachments = [p for p in message.iter_attachments() if p.get_content_type() == "text/csv"]
    assert len(images) == 1 and len(attachments) == 1
    assert isinstance(images[0], EmailMessage) and isinstance(attachments[0], EmailMessage)
    return html, images[0], attachments[0]


def test_weekly_report_email_has_html_inline_chart_and_csv(
    team: Session, sessions: sessionmaker[Session], smtp_settings: Settings, sink: SmtpSink
) -> None:
    outcome = send_due_reports(sessions, smtp_settings, "weekly", now=MONDAY_0700)
    assert outcome.sent == ["helena weekly 2026-W48"] and not outcome.failed
    (message,) = sink.wait_for(1, to=HELENA)
    assert "2026-W48" in message["Subject"]
    assert message["From"] == smtp_settings.report_from
    assert message.get_content_type() == "multipart/mixed"

    html, image, attachment = parts(message)
    # The HTML shows the chart through the image's Content-ID.
    (cid,) = re.findall(r'src="cid:([^"]+)"', html)
    assert image["Content-ID"] == f"<{cid}>"
    assert image.get_content().startswith(PNG_SIGNATURE)
    assert "Anna Lahtinen (anna)" in html and "Myyntitoimenpide" in html
    assert "Päättynyt jakso / Period closed: 2026-W48" in html
    assert "Kuluva jakso / Current period so far: 2026-W49" in html

    assert attachment.get_filename() == "targets-weekly-2026-W48-helena.csv"
    rows = rows_of(attachment.get_content())
    # The week just closed: the target in force (raised to 8 mid-November), actual 2 (the
    # Sunday 23:30 call counts in W48), expected the whole target: behind.
    anna = rows[("2026-W48", "anna", "sales_action")]
    assert (anna["target"], anna["actual"], anna["expected_by_now"], anna["pace"]) == (
        "8",
        "2",
        "8.0",
        "behind",
    )
    mikko = rows[("2026-W48", "mikko", "sales_action")]
    assert (mikko["target"], mikko["actual"], mikko["pace"]) == ("2", "2", "on track")
    # No target, no pace; every seller of helena's is in the report.
    visits = rows[("2026-W48", "anna", "customer_visit")]
    assert (visits["target"], visits["actual"], visits["pace"]) == ("", "0", "")
    # The current week so far: the call given in UTC that is already Monday in Helsinki.
    assert rows[("2026-W49", "anna", "sales_action")]["actual"] == "1"
    assert {period for period, _, _ in rows} == {"2026-W48", "2026-W49"}


def test_a_duplicate_beat_tick_sends_one_report(
    team: Session, sessions: sessionmaker[Session], smtp_settings: Settings, sink: SmtpSink
) -> None:
    first = send_due_reports(sessions, smtp_settings, "weekly", now=MONDAY_0700)
    second = send_due_reports(sessions, smtp_settings, "weekly", now=MONDAY_0700)
    later = send_due_reports(
        sessions, smtp_settings, "weekly", now=MONDAY_0700.replace(hour=7, minute=15)
    )
    assert first.sent == ["helena weekly 2026-W48"]
    assert second.sent == later.sent == []
    assert second.skipped == later.skipped == ["helena weekly 2026-W48"]
    assert len(sink.wait_for(1, to=HELENA)) == 1
    with sessions() as session:
        run = report_run(session, "2026-W48")
        assert (run.state, run.attempts, run.kind) == ("sent", 1, "weekly")


def test_nothing_is_sent_before_the_managers_local_send_time(
    team: Session, sessions: sessionmaker[Session], smtp_settings: Settings, sink: SmtpSink
) -> None:
    sunday_night = datetime(2026, 11, 29, 23, 30, tzinfo=HELSINKI)
    # W47's report is due (it would have gone out last Monday); W48's is not yet.
    outcome = send_due_reports(sessions, smtp_settings, "weekly", now=sunday_night)
    assert outcome.sent == ["helena weekly 2026-W47"]
    monday_0030 = datetime(2026, 11, 30, 0, 30, tzinfo=HELSINKI)
    assert send_due_reports(sessions, smtp_settings, "weekly", now=monday_0030).sent == []
    assert [m["Subject"] for m in sink.wait_for(1, to=HELENA)] == [
        "Myynnin tavoitteet / Sales targets 2026-W47 (weekly)"
    ]


def test_a_refused_send_is_recorded_and_sent_on_retry(
    team: Session, sessions: sessionmaker[Session], smtp_settings: Settings, sink: SmtpSink
) -> None:
    sink.refuse_next = 1
    failed = send_due_reports(sessions, smtp_settings, "monthly", now=DECEMBER_1ST_0700)
    assert failed.sent == [] and [label for label, _ in failed.failed] == ["helena monthly 2026-11"]
    with sessions() as session:
        run = report_run(session, "2026-11")
        assert (run.state, run.attempts) == ("failed", 1)
        assert "451" in run.detail
    assert sink.messages(to=HELENA) == []

    retried = send_due_reports(sessions, smtp_settings, "monthly", now=DECEMBER_1ST_0700)
    assert retried.sent == ["helena monthly 2026-11"]
    assert sink.refused == 1 and len(sink.wait_for(1, to=HELENA)) == 1
    with sessions() as session:
        run = report_run(session, "2026-11")
        assert (run.state, run.attempts) == ("sent", 2)
        assert "451" in run.detail  # the failed attempt stays on record
        assert run.sent_at is not None


def test_a_target_changed_mid_month_applies_to_that_month_and_later_weeks(
    team: Session, sessions: sessionmaker[Session], smtp_settings: Settings, sink: SmtpSink
) -> None:
    helena = team.scalar(select(Staff).where(Staff.username == "helena"))
    assert helena is not None
    monthly = build_target_report(team, helena, "monthly", now=DECEMBER_1ST_0700)
    november = rows_of(monthly.csv_text)[("2026-11", "anna", "sales_action")]
    # Four sales actions in November (the UTC one on Monday 30th included), 30 expected.
    assert (november["target"], november["actual"], november["pace"]) == ("30", "4", "behind")
    weeks = {
        period: rows_of(build_target_report(team, helena, "weekly", period, MONDAY_0700).csv_text)[
            (period, "anna", "sales_action")
        ]["target"]
        for period in ("2026-W45", "2026-W46", "2026-W47", "2026-W48")
    }
    assert weeks == {"2026-W45": "5", "2026-W46": "5", "2026-W47": "8", "2026-W48": "8"}


def test_report_files_are_the_same_html_png_and_csv(team: Session, tmp_path: Path) -> None:
    helena = team.scalar(select(Staff).where(Staff.username == "helena"))
    assert helena is not None
    report = build_target_report(team, helena, "weekly", "2026-W48", MONDAY_0700)
    html_path, png_path, csv_path = write_report_files(report, tmp_path)
    assert png_path.read_bytes() == report.chart_png
    assert png_path.read_bytes().startswith(PNG_SIGNATURE)
    assert csv_path.read_bytes() == report.csv_text.encode("utf-8")
    assert f'src="{png_path.name}"' in html_path.read_text(encoding="utf-8")


def test_a_path_like_manager_username_never_leaves_the_report_folder(
    team: Session, tmp_path: Path
) -> None:
    helena = team.scalar(select(Staff).where(Staff.username == "helena"))
    assert helena is not None
    report = build_target_report(team, helena, "weekly", "2026-W48", MONDAY_0700)
    report.manager = "../../outside/helena"
    (tmp_path / "outside").mkdir()
    out = tmp_path / "reports" / "deep"
    paths = write_report_files(report, out)
    assert all(path.parent == out for path in paths)
    assert paths[0].name == "targets-weekly-2026-W48-_.._outside_helena.html"
    assert list((tmp_path / "outside").iterdir()) == []


def test_reports_go_over_starttls_with_login(
    team: Session, sessions: sessionmaker[Session], settings: Settings, tmp_path: Path
) -> None:
    certificate, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(certificate), "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    secure = SmtpSink(tls=(str(certificate), str(key)), credentials=("reports", "s3cret")).start()
    try:
        tls_settings = dataclasses.replace(
            settings,
            smtp_host=secure.host,
            smtp_port=secure.port,
            smtp_starttls=True,
            smtp_ca_file=certificate,
            smtp_user="reports",
            smtp_password="s3cret",
        )
        outcome = send_due_reports(sessions, tls_settings, "weekly", now=MONDAY_0700)
        assert outcome.sent == ["helena weekly 2026-W48"], outcome.failed
        assert secure.logins == ["reports"]
        assert len(secure.wait_for(1, to=HELENA)) == 1
    finally:
        secure.stop()


def test_the_team_row_weighs_the_target_against_the_sellers_who_have_one(team: Session) -> None:
    helena = team.scalar(select(Staff).where(Staff.username == "helena"))
    assert helena is not None
    # December 1st: November closed (anna: monthly target 30, 4 sales actions; mikko: no
    # monthly target, 2 sales actions), December just begun (1/31 of it gone).
    report = build_target_report(team, helena, "monthly", now=DECEMBER_1ST_0700)
    sales, visits = (
        next(t for t in team_totals(report.rows, "2026-11") if t["category"] == code)
        for code in ("sales_action", "customer_visit")
    )
    assert (sales["target"], sales["actual"], sales["actual_untargeted"]) == (30, 4, 2)
    assert (sales["sellers"], sales["behind"]) == (1, 1)
    assert (visits["target"], visits["actual"], visits["expected"]) == (None, None, None)

    html = report.html("chart.png")
    team_rows = re.findall(r'<tr class="total">(.*?)</tr>', html, re.S)
    november_sales, november_visits = (
        next(r for r in team_rows if name in r) for name in ("Myyntitoimenpide", "Asiakaskäynti")
    )
    assert "(+2 ilman tavoitetta / without a target)" in november_sales
    assert "1 myyjä jäljessä / 1 seller behind" in november_sales
    # No target in the category: nothing to be behind or on track with.
    assert "behind" not in november_visits and "on track" not in november_visits
    assert november_visits.count("–") >= 3
    # Pace words in both languages, numbers as a Finnish reader writes them (decimal comma).
    assert "jäljessä / behind" in html
    december = [r for r in report.rows if r["period"] == "2026-12" and r["target"] is not None]
    expected = december[0]["expected_by_now"]
    assert expected % 1 and f"{expected:.1f}".replace(".", ",") in html
