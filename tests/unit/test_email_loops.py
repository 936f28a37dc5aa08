"""Auto-replies, bounces and mail loops are not events: rejected with the reason, never stored."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, delete, select
from sqlalchemy.orm import Session

from models.events import CrmEvent
from models.mail import EmailSenderWindow
from tasks.context import StageContext
from tasks.errors import BadInput
from tasks.ingest.email import check_sender_limit, ingest_email
from tests.unit.test_samples_emails import email_count, simple_email, wrap


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ("Auto-Submitted: auto-replied", "auto-reply: Auto-Submitted: auto-replied"),
        ("Auto-Submitted: auto-generated", "auto-reply: Auto-Submitted: auto-generated"),
        ("Auto-Submitted: auto-notified; owner-email=x@y.fi", "Auto-Submitted: auto-notified"),
        ("X-Autoreply: yes", "auto-reply: X-Autoreply header present"),
        ("X-Autorespond: Olen lomalla", "auto-reply: X-Autorespond header present"),
        ("Precedence: bulk", "Precedence: bulk"),
        ("Precedence: junk", "Precedence: junk"),
        ("Precedence: auto_reply", "Precedence: auto_reply"),
    ],
)
def test_auto_replies_are_rejected_with_the_reason(
    world: Session, ctx: StageContext, header: str, reason: str
) -> None:
    raw = simple_email(message_id=f"<auto-{uuid.uuid4().hex}@x.fi>", extra_headers=header + "\r\n")
    with pytest.raises(BadInput) as caught:
        ingest_email(world, ctx, wrap(raw, ctx))
    assert reason in caught.value.reason
    assert email_count(world) == 0


def test_auto_submitted_no_is_a_person_writing(world: Session, ctx: StageContext) -> None:
    raw = simple_email(extra_headers="Auto-Submitted: no\r\nPrecedence: first-class\r\n")
    assert ingest_email(world, ctx, wrap(raw, ctx)).outcome == "stored"


def test_delivery_reports_and_bounces_are_rejected(world: Session, ctx: StageContext) -> None:
    report = simple_email(
        message_id="<dsn-1@mx.example.com>",
        content_type='multipart/report; report-type=delivery-status; boundary="r"',
        body=b"--r\r\nContent-Type: text/plain\r\n\r\nUndeliverable\r\n--r--\r\n",
    )
    with pytest.raises(BadInput) as caught:
        ingest_email(world, ctx, wrap(report, ctx))
    assert "delivery status notification" in caught.value.reason
    # The null reverse-path (MAIL FROM:<>) marks bounces and automatic notices.
    bounce = {**wrap(simple_email(message_id="<bounce-1@x.fi>"), ctx), "mail_from": ""}
    with pytest.raises(BadInput) as caught:
        ingest_email(world, ctx, bounce)
    assert "null envelope sender" in caught.value.reason
    assert email_count(world) == 0


def limited(ctx: StageContext, limit: int) -> StageContext:
    return StageContext(
        dataclasses.replace(ctx.settings, email_sender_limit=limit), task_id=ctx.task_id
    )


def test_a_sender_over_the_limit_is_rejected_as_a_mail_loop(
    world: Session, ctx: StageContext
) -> None:
    strict = limited(ctx, 3)
    first = wrap(simple_email(message_id="<loop-0@x.fi>"), strict)
    outcomes = [ingest_email(world, strict, first).outcome]
    for n in range(1, 3):
        raw = simple_email(message_id=f"<loop-{n}@x.fi>")
        outcomes.append(ingest_email(world, strict, wrap(raw, strict)).outcome)
    assert outcomes == ["stored"] * 3
    # A redelivery is a duplicate, not a fourth email.
    assert ingest_email(world, strict, first).outcome == "duplicate"
    fourth = wrap(simple_email(message_id="<loop-3@x.fi>"), strict)
    with world.begin_nested() as savepoint:
        with pytest.raises(BadInput) as caught:
            ingest_email(world, strict, fourth)
        savepoint.rollback()
    assert caught.value.reason == (
        "mail loop suspected: matti.virtanen@pohjolankone.fi sent more than 3 emails to the"
        " CRM address within 3600 s"
    )
    assert email_count(world) == 3
    # Another sender is not affected.
    other = simple_email(message_id="<other-1@x.fi>").replace(
        b"matti.virtanen@pohjolankone.fi", b"liisa.korhonen@pohjolankone.fi"
    )
    assert ingest_email(world, strict, wrap(other, strict)).outcome == "stored"
    # The next window starts from zero.
    for window in world.scalars(select(EmailSenderWindow)):
        window.window_start -= timedelta(seconds=strict.settings.email_sender_window_s)
    world.flush()
    assert ingest_email(world, strict, fourth).outcome == "stored"


def test_the_limit_is_shared_by_every_worker_process(engine: Engine, ctx: StageContext) -> None:
    # Two connections stand for two worker processes: the count is in the database, so the
    # second process sees what the first committed.
    sender = f"loop-{uuid.uuid4().hex}@example.com"
    settings = dataclasses.replace(ctx.settings, email_sender_limit=2)
    try:
        for _ in range(2):
            with Session(engine) as session, session.begin():
                check_sender_limit(session, settings, sender)
        with pytest.raises(BadInput), Session(engine) as session, session.begin():
            check_sender_limit(session, settings, sender)
        with Session(engine) as session:
            counts = session.scalars(
                select(EmailSenderWindow.count).where(EmailSenderWindow.sender == sender)
            ).all()
        assert counts == [2]  # the refused third email was rolled back with its transaction
    finally:
        with Session(engine) as session, session.begin():
            session.execute(delete(EmailSenderWindow).where(EmailSenderWindow.sender == sender))


def test_a_rolled_back_clean_up_of_old_windows_is_done_by_the_next_email(
    engine: Engine, ctx: StageContext
) -> None:
    from tasks.ingest import email as stage

    window = ctx.settings.email_sender_window_s
    old = f"old-{uuid.uuid4().hex}@example.com"
    ancient = datetime.now(UTC) - timedelta(seconds=3 * window)

    def old_rows() -> int:
        with Session(engine) as session:
            return len(
                session.scalars(
                    select(EmailSenderWindow.count).where(EmailSenderWindow.sender == old)
                ).all()
            )

    sender = f"new-{uuid.uuid4().hex}@example.com"
    try:
        with Session(engine) as session, session.begin():
            session.add(EmailSenderWindow(sender=old, window_start=ancient, count=1))
        stage._windows_cleared.pop(window, None)  # this process has not cleared this window
        with Session(engine) as session, session.begin():
            check_sender_limit(session, ctx.settings, sender)
            session.rollback()  # the email failed after the check: nothing of it stays
        assert old_rows() == 1
        with Session(engine) as session, session.begin():
            check_sender_limit(session, ctx.settings, sender)
        assert old_rows() == 0
    finally:
        with Session(engine) as session, session.begin():
            session.execute(delete(EmailSenderWindow).where(EmailSenderWindow.sender.in_([old])))
            session.execute(delete(EmailSenderWindow).where(EmailSenderWindow.sender.like("new-%")))


def test_limit_zero_switches_the_check_off(world: Session, ctx: StageContext) -> None:
    off = limited(ctx, 0)
    for n in range(3):
        raw = simple_email(message_id=f"<off-{n}@x.fi>")
        assert ingest_email(world, off, wrap(raw, off)).outcome == "stored"
    assert world.scalar(select(EmailSenderWindow.count)) is None
    assert len(world.scalars(select(CrmEvent.id)).all()) == 3
