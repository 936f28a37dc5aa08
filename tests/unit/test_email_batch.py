"""The set-based stage of a batch's new emails stores what the email stage would have stored:
the same events, threads, documents, party keys, participants, ledger rows, sender windows,
counts and outcomes."""

from __future__ import annotations

import base64
import re
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from models.documents import DocumentBlob, EventDocument
from models.events import CrmEvent, EventParticipant, EventPropertyLink
from models.ledger import Delivery, InboundMessage, RejectedMessage
from models.mail import EmailSenderWindow
from models.parties import EventPartyKey, Lead
from models.targets import Tally
from tasks import batch as batch_stage
from tasks.attach import store_blob
from tasks.batch import ingest_batch
from tasks.context import StageContext
from tasks.ingest import email_batch
from tasks.ingest.email import ingest_email
from tasks.maintenance import reconcile
from tests.unit.test_call_batch import batch_lock_free
from tests.unit.test_samples_emails import email_with_attachment, sample, simple_email
from workers.publish import email_message_from_raw

QUEUES = {"crm.ingest.email": "crm.ingest.email"}


def batch(messages: list[Any]) -> dict[str, Any]:
    return {
        "schema": "crm.batch/1",
        "source_system": "import",
        "kind": "email",
        "messages": messages,
    }


def wrap(raw: bytes, ctx: StageContext, source_system: str = "import") -> dict[str, Any]:
    return email_message_from_raw(raw, ctx.settings, source_system)


def reply(message_id: str, answers: str = "", references: str = "", sender: str = "") -> bytes:
    extra = f"In-Reply-To: <{answers}>\r\n" if answers else ""
    extra += f"References: {references}\r\n" if references else ""
    raw = simple_email(
        message_id=f"<{message_id}>", subject=f"Re: {message_id}", extra_headers=extra
    )
    if sender:
        raw = raw.replace(b"Matti Virtanen <matti.virtanen@pohjolankone.fi>", sender.encode())
    return raw


HTML_PAGE = b"<html><body><script>alert(1)</script><p>Hinnasto</p></body></html>"


def html_email(message_id: str) -> bytes:
    encoded = base64.encodebytes(HTML_PAGE).decode("ascii")
    return (
        "From: Matti Virtanen <matti.virtanen@pohjolankone.fi>\r\n"
        "To: crm@myyntitalo.fi\r\n"
        "Subject: Hinnasto\r\n"
        "Date: Tue, 24 Nov 2026 11:00:00 +0200\r\n"
        f"Message-ID: <{message_id}>\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="B"\r\n'
        "\r\n--B\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nLiitteena.\r\n"
        "--B\r\nContent-Type: text/html\r\nContent-Transfer-Encoding: base64\r\n"
        'Content-Disposition: attachment; filename="../../etc/hinnasto.html"\r\n\r\n'
        f"{encoded}--B--\r\n"
    ).encode("ascii")


def mixed_emails(db: Session, ctx: StageContext) -> list[Any]:
    """A mailbox backfill's worth of cases: a forwarded memo and the offer of its thread, an
    inline forward, a plus-address category, a conversation whose replies come before the email
    they answer, an unknown sender, a staff memo naming its customer by number, an HTML page
    under a path-like name, no Message-ID, a PDF shared by two emails, a stored raw email
    (``raw_ref``), and what the set-based stage leaves to the email stage: an auto-reply, a
    calendar invitation, the same bytes twice, one Message-ID through two mailboxes, an email
    stored before and a message that is no email."""
    by_reference = wrap(reply("b-ref@pohjolankone.fi"), ctx)
    raw = base64.b64decode(by_reference.pop("raw_b64"))
    by_reference["raw_ref"] = store_blob(db, ctx.settings, raw, "message/rfc822")
    memo = (
        b"From: Anna Lahtinen <anna.lahtinen@myyntitalo.fi>\r\nTo: crm@myyntitalo.fi\r\n"
        b"Subject: Puhelu\r\nDate: Tue, 24 Nov 2026 12:00:00 +0200\r\n"
        b"Message-ID: <b-memo@myyntitalo.fi>\r\n\r\nAsiakas: 10002. Soitin, tarjous tulossa.\r\n"
    )
    twice = wrap(reply("b-twice@pohjolankone.fi"), ctx)
    return [
        wrap(sample("forwarded-memo-rfc822.eml"), ctx),
        wrap(sample("bcc-offer-with-pdf.eml"), ctx),
        wrap(sample("forwarded-inline-outlook-fi.eml"), ctx),
        wrap(sample("plus-address-visit-memo.eml"), ctx),
        wrap(sample("auto-reply.eml"), ctx),
        wrap(sample("meeting-invitation-google.eml"), ctx),
        # c answers b, which answers a: both replies come first.
        wrap(reply("b-c@pohjolankone.fi", answers="b-b@myyntitalo.fi"), ctx),
        wrap(reply("b-a@pohjolankone.fi"), ctx),
        wrap(
            reply(
                "b-b@myyntitalo.fi",
                answers="b-a@pohjolankone.fi",
                references="<b-a@pohjolankone.fi>",
            ),
            ctx,
        ),
        wrap(reply("b-unknown@tuntematon.fi", sender="Outo <outo@tuntematon.fi>"), ctx),
        wrap(memo, ctx),
        wrap(html_email("b-html@pohjolankone.fi"), ctx),
        wrap(simple_email(message_id=None, subject="Ilman tunnistetta"), ctx),
        wrap(email_with_attachment("attachment", message_id="<b-pdf-1@pohjolankone.fi>"), ctx),
        wrap(email_with_attachment("inline", message_id="<b-pdf-2@pohjolankone.fi>"), ctx),
        by_reference,
        twice,
        dict(twice),
        wrap(reply("b-twice@pohjolankone.fi"), ctx, source_system="other-mailbox"),
        wrap(reply("b-before@pohjolankone.fi"), ctx),
        {"schema": "crm.email/1", "source_system": "import", "colour": "red"},
        # x answers an email not held; y answers x alone: y joins x's thread, keyed by w.
        wrap(reply("b-x@pohjolankone.fi", answers="b-w@pohjolankone.fi"), ctx),
        wrap(reply("b-y@myyntitalo.fi", answers="b-x@pohjolankone.fi"), ctx),
    ]


def snapshot(db: Session) -> dict[str, Any]:
    """What users see of the emails: every column but ids and clocks, by Message-ID."""
    db.flush()
    events = db.scalars(select(CrmEvent).order_by(CrmEvent.source_id)).all()
    key_of = {e.id: f"{e.source_kind}:{e.source_id}" for e in events}
    skip = {"id", "created_at", "updated_at"}
    return {
        "events": {
            key_of[e.id]: {
                c.key: comparable(getattr(e, c.key), key_of)
                for c in CrmEvent.__table__.columns
                if c.key not in skip
            }
            for e in events
        },
        "properties": sorted(
            (key_of[p.event_id], p.property_code) for p in db.scalars(select(EventPropertyLink))
        ),
        "keys": sorted(
            (key_of[k.event_id], k.kind, k.value, k.position)
            for k in db.scalars(select(EventPartyKey))
        ),
        "participants": sorted(
            (key_of[p.event_id], p.staff_id) for p in db.scalars(select(EventParticipant))
        ),
        "documents": sorted(
            (key_of[d.event_id], d.role, d.filename, d.sha256 or "", d.media_type, d.size, d.note)
            for d in db.scalars(select(EventDocument))
        ),
        "blobs": sorted((b.sha256, b.size, b.media_type) for b in db.scalars(select(DocumentBlob))),
        "ledger": sorted(
            (m.idempotency_key, m.source_id, key_of.get(m.event_id or 0), str(m.payload))
            for m in db.scalars(select(InboundMessage))
        ),
        "windows": sorted((w.sender, w.count) for w in db.scalars(select(EmailSenderWindow))),
        "leads": sorted(
            (x.kind, x.value, key_of.get(x.event_id or 0)) for x in db.scalars(select(Lead))
        ),
        "tallies": sorted(
            (t.seller_id, t.category_code, t.period, t.count) for t in db.scalars(select(Tally))
        ),
        "outcomes": sorted(
            (d.task_id, d.outcome, d.detail, key_of.get(d.event_id or 0))
            for d in db.scalars(select(Delivery).where(Delivery.task_id.like("imp/%")))
        ),
        "rejected": sorted(
            (r.task_id, r.reason)
            for r in db.scalars(
                select(RejectedMessage).where(RejectedMessage.task_id.like("imp/%"))
            )
        ),
    }


def comparable(value: Any, key_of: dict[int, str]) -> Any:
    """Without what names a row by its id: a note's ``event #N`` (its key instead), a meeting's
    latest ledger row."""
    if isinstance(value, dict):
        return {k: comparable(v, key_of) for k, v in value.items() if k != "updated_by_message"}
    if isinstance(value, list):
        return [comparable(v, key_of) for v in value]
    if isinstance(value, str):
        return re.sub(r"#(\d+)", lambda m: "#" + key_of.get(int(m[1]), m[1]), value)
    return value


def run_batch(db: Session, ctx: StageContext, messages: list[Any]) -> Any:
    context = StageContext(ctx.settings, "imp", "crm.ingest.batch")
    return ingest_batch(db, context, batch(messages), queue_of=QUEUES.get)


def both_ways(
    db: Session, ctx: StageContext, monkeypatch: pytest.MonkeyPatch, messages: list[Any]
) -> tuple[dict[str, Any], dict[str, Any], list[int]]:
    """The batch message by message, rolled back; then with the set-based stage. Returns both
    snapshots and the indexes of the messages the email stage took in the second run."""
    task_name, stage = batch_stage.STAGES["email"]
    by_stage: list[int] = []
    position = {id(message): index for index, message in enumerate(messages)}

    def counted(session: Session, context: StageContext, message: Any) -> Any:
        by_stage.append(position[id(message)])
        return stage(session, context, message)

    savepoint = db.begin_nested()
    with monkeypatch.context() as patch:
        patch.setattr(batch_stage, "BULK_STAGES", {})
        run_batch(db, ctx, messages)
        one_by_one = snapshot(db)
    savepoint.rollback()
    db.expunge_all()
    monkeypatch.setitem(batch_stage.STAGES, "email", (task_name, counted))
    run_batch(db, ctx, messages)
    return one_by_one, snapshot(db), by_stage


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_a_mailbox_backfill_stores_what_the_email_stage_would(
    database: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    if database == "sqlite":
        world, ctx = request.getfixturevalue("sqlite_world")
    else:
        world, ctx = request.getfixturevalue("world"), request.getfixturevalue("ctx")
    messages = mixed_emails(world, ctx)
    ingest_email(world, ctx, wrap(reply("b-before@pohjolankone.fi"), ctx))
    one_by_one, set_based, by_stage = both_ways(world, ctx, monkeypatch, messages)

    # The email stage took the auto-reply, the invitation, the repeated bytes and Message-ID,
    # the email stored before and the message that is no email; the set-based stage the rest.
    assert sorted(by_stage) == [4, 5, 17, 18, 19, 20]
    assert set_based == one_by_one
    events = set_based["events"]
    threads = {k: e["thread_key"] for k, e in events.items()}
    assert threads["email:b-c@pohjolankone.fi"] == "b-a@pohjolankone.fi"
    assert threads["email:b-b@myyntitalo.fi"] == "b-a@pohjolankone.fi"
    assert threads["email:b-y@myyntitalo.fi"] == "b-w@pohjolankone.fi"
    memo, offer = "email:fwd-20261120090500.77@myyntitalo.fi", "email:offer-2026-118@myyntitalo.fi"
    assert threads[memo] == threads[offer] is not None
    assert events["email:b-memo@myyntitalo.fi"]["link_state"] == "linked"
    assert events["email:b-unknown@tuntematon.fi"]["link_state"] == "unlinked"
    assert any(key.startswith("meeting:") for key in events)
    assert any(
        d[1] == "attachment" and d[2] == "hinnasto.html" and "sanitised" in d[6]
        for d in set_based["documents"]
    )
    outcomes = [o[1] for o in set_based["outcomes"]]
    assert outcomes.count("stored") == 18
    assert outcomes.count("duplicate") == 3 and outcomes.count("rejected") == 2
    assert reconcile(world, ctx).drift == 0


def test_the_lead_rule_and_the_sender_limit_are_the_email_stage_s(
    world: Session, ctx: StageContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With leads from unknown senders on, an unknown sender's email goes through the email
    stage, which makes it the lead; a sender whose window would pass the limit has all its
    emails there too (the stage rejects the one over it); the others stay set-based."""
    settings = replace(ctx.settings, lead_from_unknown_emails=True, email_sender_limit=2)
    leads = StageContext(settings, ctx.task_id)
    loud = "Jussi <jussi@pohjolankone.fi>"
    messages = [
        wrap(reply("b-lead@tuntematon.fi", sender="Outo <outo@tuntematon.fi>"), leads),
        wrap(reply("b-loud-1@pohjolankone.fi", sender=loud), leads),
        wrap(reply("b-known@pohjolankone.fi"), leads),
        wrap(reply("b-loud-2@pohjolankone.fi", sender=loud), leads),
        wrap(reply("b-loud-3@pohjolankone.fi", sender=loud), leads),
    ]
    one_by_one, set_based, by_stage = both_ways(world, leads, monkeypatch, messages)
    assert sorted(by_stage) == [0, 1, 3, 4]
    assert set_based == one_by_one
    assert set_based["events"]["email:b-lead@tuntematon.fi"]["category_code"] == "lead"
    assert [r[1] for r in set_based["rejected"]] == [
        "mail loop suspected: jussi@pohjolankone.fi sent more than 2 emails to the CRM address"
        f" within {settings.email_sender_window_s} s"
    ]


def test_a_thread_shared_with_an_email_left_to_the_stage_sends_the_batch_message_by_message(
    world: Session, ctx: StageContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lead (left to the stage, stored after the set-based emails) answers an email of the
    batch: the whole batch goes through the email stage, in its order."""
    settings = replace(ctx.settings, lead_from_unknown_emails=True)
    leads = StageContext(settings, ctx.task_id)
    messages = [
        wrap(reply("b-t-lead@tuntematon.fi", sender="Outo <outo@tuntematon.fi>"), leads),
        wrap(reply("b-t-answer@pohjolankone.fi", answers="b-t-lead@tuntematon.fi"), leads),
    ]
    one_by_one, set_based, by_stage = both_ways(world, leads, monkeypatch, messages)
    assert by_stage == [0, 1]
    assert set_based == one_by_one


def test_replies_stored_before_their_original_send_the_batch_message_by_message(
    world: Session, ctx: StageContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reply stored before the batch names an email of the batch as its thread; the email
    stage joins them, and the batch lets it."""
    ingest_email(world, ctx, wrap(reply("b-r-2@pohjolankone.fi", answers="b-r-1@x.fi"), ctx))
    messages = [
        wrap(reply("b-r-1@x.fi", answers="b-r-0@x.fi"), ctx),
        wrap(reply("b-r-3@pohjolankone.fi"), ctx),
    ]
    one_by_one, set_based, by_stage = both_ways(world, ctx, monkeypatch, messages)
    assert by_stage == [0, 1]
    assert set_based == one_by_one
    assert set_based["events"]["email:b-r-2@pohjolankone.fi"]["thread_key"] == "b-r-0@x.fi"


def test_over_the_memory_bound_the_rest_goes_through_the_email_stage(
    world: Session, ctx: StageContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    messages = [wrap(reply(f"b-m-{n}@pohjolankone.fi"), ctx) for n in range(4)]
    size = len(base64.b64decode(messages[0]["raw_b64"]))
    monkeypatch.setattr(email_batch, "BATCH_BYTES", 2 * size + size // 2)
    one_by_one, set_based, by_stage = both_ways(world, ctx, monkeypatch, messages)
    assert by_stage == [2, 3]
    assert set_based == one_by_one


def test_an_email_stored_meanwhile_sends_the_batch_message_by_message(
    world: Session, ctx: StageContext, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another worker stored one of the batch's emails after the set-based stage looked (its
    event appears only when the batch inserts its own): the stage gives up, rolls back, and the
    email stage gives every message its outcome, under the batch lock."""
    messages = [wrap(reply("b-race-1@pohjolankone.fi"), ctx), wrap(reply("b-race-2@x.fi"), ctx)]
    ingest_email(world, ctx, messages[1])
    monkeypatch.setattr(email_batch, "_leave_known", lambda session, emails, result: emails)
    result = run_batch(world, ctx, messages)
    assert dict(result.outcomes) == {"stored": 1, "duplicate": 1}
    assert not batch_lock_free(engine)


def test_batches_of_new_emails_write_side_by_side(
    world: Session, ctx: StageContext, engine: Engine
) -> None:
    """A batch of new emails leaves the batch lock free while it is uncommitted; one that leaves
    a message to the email stage holds it."""
    result = run_batch(
        world, ctx, [wrap(reply(f"b-side-{n}@pohjolankone.fi"), ctx) for n in (1, 2)]
    )
    assert dict(result.outcomes) == {"stored": 2}
    assert batch_lock_free(engine)

    result = run_batch(world, ctx, [wrap(reply("b-side-3@pohjolankone.fi"), ctx), {"colour": 1}])
    assert dict(result.outcomes) == {"stored": 1, "rejected": 1}
    assert not batch_lock_free(engine)
