"""Managers' target reports through the real worker to a real SMTP server on loopback."""

from __future__ import annotations

import csv
import io
import re
import uuid
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select

from config.settings import Settings
from models.parties import Staff
from models.targets import ReportRun
from tasks.reports import due_period
from tests.integration.conftest import LiveSystem
from tests.smtp_sink import SmtpSink
from workers.publish import wait_for

pytestmark = pytest.mark.integration

BOSS = "rp-boss@myyntitalo.fi"


def staff(username: str, **fields: object) -> dict[str, object]:
    return {
        "schema": "crm.party/1",
        "source_system": "erp",
        "kind": "staff",
        "username": username,
        "name": username.replace("rp-", "").title(),
        "email": f"{username}@myyntitalo.fi",
        **fields,
    }


def sales_action(call_id: str, agent: str, started_at: str) -> dict[str, object]:
    return {
        "schema": "crm.call/1",
        "source_system": "pbx-rp",
        "call_id": call_id,
        "status": "completed",
        "direction": "outbound",
        "from": "401",
        "to": "+358 40 700 0100",
        "agent": agent,
        "started_at": started_at,
        "category": "sales_action",
    }


@pytest.fixture(scope="module")
def team(live: LiveSystem) -> LiveSystem:
    parties = [
        staff("rp-boss", role="manager"),
        staff("rp-aino", manager="rp-boss"),
        staff("rp-eero", manager="rp-boss"),
    ]
    assert {d.outcome for d in live.publish("party", parties)} == {"done"}
    targets = [
        {"schema": "crm.target/1", "source_system": "erp", "seller": seller,
         "category": "sales_action", "kind": kind, "value": value, "valid_from": "2026-10-01"}
        for seller, kind, value in (
            ("rp-aino", "weekly", 3), ("rp-eero", "weekly", 2), ("rp-aino", "monthly", 10)
        )
    ]  # fmt: skip
    assert {d.outcome for d in live.publish("target", targets)} == {"done"}
    calls = [
        sales_action("rp-1", "rp-aino", "2026-11-16T09:00:00+02:00"),
        sales_action("rp-2", "rp-aino", "2026-11-22T23:30:00+02:00"),  # Sunday night: W47
        sales_action("rp-3", "rp-eero", "2026-11-22T22:30:00Z"),  # Monday in Helsinki: W48
    ]
    assert {d.outcome for d in live.publish("call", calls)} == {"stored"}
    return live


def run_report_task(live: LiveSystem, *args: str | None, times: int = 1) -> None:
    """Publish crm.reports.targets (as beat does) and wait until every copy has finished."""
    ids = [str(uuid.uuid4()) for _ in range(times)]
    for task_id in ids:
        live.app.send_task(
            "crm.reports.targets", args=list(args), task_id=task_id, queue="crm.reports"
        )
    done = wait_for(live.sessions, ids, timeout=60)
    assert set(done) == set(ids), f"report tasks did not finish:\n{live.tail()}"
    assert {d.outcome for d in done.values()} == {"done"}, [d.detail for d in done.values()]


def reports_to(sink: SmtpSink, address: str, period: str) -> list[EmailMessage]:
    return [m for m in sink.messages(to=address) if period in m["Subject"]]


def csv_rows(message: EmailMessage) -> list[dict[str, str]]:
    (attachment,) = [p for p in message.iter_attachments() if p.get_content_type() == "text/csv"]
    assert isinstance(attachment, EmailMessage)
    return list(csv.DictReader(io.StringIO(attachment.get_content())))


def run_of(live: LiveSystem, manager: str, period: str) -> ReportRun:
    with live.sessions() as session:
        run = session.scalar(
            select(ReportRun)
            .join(Staff, Staff.id == ReportRun.manager_id)
            .where(Staff.username == manager, ReportRun.period == period)
        )
        assert run is not None
        return run


def test_duplicate_ticks_send_one_report(team: LiveSystem, smtp_sink: SmtpSink) -> None:
    run_report_task(team, "weekly", "2026-W47", "rp-boss", times=2)
    (message,) = reports_to(smtp_sink, BOSS, "2026-W47")
    html_part = message.get_body(preferencelist=("html",))
    assert isinstance(html_part, EmailMessage)
    (cid,) = re.findall(r'src="cid:([^"]+)"', html_part.get_content())
    (image,) = [p for p in message.walk() if p.get_content_type() == "image/png"]
    assert image["Content-ID"] == f"<{cid}>"
    rows = {(r["period"], r["seller"], r["category"]): r for r in csv_rows(message)}
    aino = rows[("2026-W47", "rp-aino", "sales_action")]
    assert (aino["target"], aino["actual"], aino["pace"]) == ("3", "2", "behind")
    eero = rows[("2026-W47", "rp-eero", "sales_action")]
    assert (eero["target"], eero["actual"]) == ("2", "0")
    assert run_of(team, "rp-boss", "2026-W47").state == "sent"


def test_duplicate_beat_ticks_in_the_managers_zone_send_one_report(
    team: LiveSystem, smtp_sink: SmtpSink
) -> None:
    # A manager in a zone where this week's report is already due (one of these always is).
    now = datetime.now(UTC)
    zone = next(
        z
        for z in ("Europe/Helsinki", "America/New_York", "Asia/Tokyo")
        if due_period("weekly", now, ZoneInfo(z), Settings()) is not None
    )
    period = due_period("weekly", now, ZoneInfo(zone), Settings())
    assert period is not None
    parties = [
        staff("rp-beat", role="manager", time_zone=zone),
        staff("rp-lumi", manager="rp-beat"),
    ]
    assert {d.outcome for d in team.publish("party", parties)} == {"done"}
    run_report_task(team, "weekly", times=2)  # exactly what beat sends, twice
    assert len(reports_to(smtp_sink, "rp-beat@myyntitalo.fi", period)) == 1
    run_report_task(team, "weekly")  # the next tick
    assert len(reports_to(smtp_sink, "rp-beat@myyntitalo.fi", period)) == 1


def test_a_refused_report_is_retried_and_recorded(team: LiveSystem, smtp_sink: SmtpSink) -> None:
    smtp_sink.refuse_next = 1
    run_report_task(team, "monthly", "2026-11", "rp-boss")
    assert smtp_sink.refused == 1
    (message,) = reports_to(smtp_sink, BOSS, "2026-11")
    rows = {(r["period"], r["seller"], r["category"]): r for r in csv_rows(message)}
    assert rows[("2026-11", "rp-aino", "sales_action")]["actual"] == "2"
    run = run_of(team, "rp-boss", "2026-11")
    assert (run.state, run.attempts) == ("sent", 2)
    assert "451" in run.detail


def test_report_command_writes_the_same_files_and_never_sends_twice(
    team: LiveSystem, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    result = team.cli(
        *("report", "targets", "--kind", "weekly", "--period", "2026-W47"),
        *("--manager", "rp-boss", "--out", str(tmp_path)),
    )
    assert result.returncode == 0, result.stderr
    stem = "targets-weekly-2026-W47-rp-boss"
    assert result.stdout.split() == [
        str(tmp_path / f"{stem}.{ext}") for ext in ("html", "png", "csv")
    ]
    html = (tmp_path / f"{stem}.html").read_text(encoding="utf-8")
    assert f'src="{stem}.png"' in html and "Aino (rp-aino)" in html
    assert (tmp_path / f"{stem}.png").read_bytes().startswith(b"\x89PNG")
    with open(tmp_path / f"{stem}.csv", encoding="utf-8", newline="") as handle:
        written = list(csv.DictReader(handle))
    (emailed,) = reports_to(smtp_sink, BOSS, "2026-W47")
    assert [r for r in written if r["period"] == "2026-W47"] == [
        r for r in csv_rows(emailed) if r["period"] == "2026-W47"
    ]

    again = team.cli(
        *("report", "targets", "--kind", "weekly", "--period", "2026-W47"),
        *("--manager", "rp-boss", "--send"),
    )
    assert again.returncode == 0, again.stderr
    assert "already sent, not sent again" in again.stderr
    assert len(reports_to(smtp_sink, BOSS, "2026-W47")) == 1

    wrong = team.cli("report", "targets", "--kind", "monthly", "--period", "2026-W47")
    assert wrong.returncode == 2 and "2026-W47 is not a monthly period" in wrong.stderr
