"""The email samples and hostile or odd emails through the email stage, on a real database."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from models.documents import DocumentBlob
from models.events import CrmEvent
from tasks.attach import read_blob, sanitise_filename
from tasks.context import StageContext
from tasks.errors import BadInput
from tasks.ingest.email import ingest_email
from tasks.views import events_json
from tests.conftest import EXAMPLES
from workers.publish import email_message_from_raw

PDF_BYTES = b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog >>\nendobj\n%%EOF\n"


def sample(name: str) -> bytes:
    return (EXAMPLES / "emails" / name).read_bytes()


def wrap(raw: bytes, ctx: StageContext) -> dict[str, Any]:
    return email_message_from_raw(raw, ctx.settings)


def ingest_raw(db: Session, ctx: StageContext, raw: bytes) -> dict[str, Any]:
    result = ingest_email(db, ctx, wrap(raw, ctx))
    assert result.outcome == "stored", result
    return event_json(db, result.event_id, ctx)


def event_json(db: Session, event_id: int | None, ctx: StageContext) -> dict[str, Any]:
    assert event_id is not None
    event = db.get_one(CrmEvent, event_id)
    return events_json(db, [event], ctx.settings.zone)[0]


def documents(event: dict[str, Any], role: str) -> list[dict[str, Any]]:
    return [d for d in event["documents"] if d["role"] == role]


def email_count(db: Session) -> int:
    return len(db.scalars(select(CrmEvent.id).where(CrmEvent.source_kind == "email")).all())


def simple_email(
    *,
    message_id: str | None = "<simple-1@pohjolankone.fi>",
    subject: str = "Kysymys",
    extra_headers: str = "",
    content_type: str = 'text/plain; charset="utf-8"',
    body: bytes = b"Hei, kysyisin huollosta.\n",
) -> bytes:
    headers = (
        "From: Matti Virtanen <matti.virtanen@pohjolankone.fi>\r\n"
        "To: crm@myyntitalo.fi\r\n"
        f"Subject: {subject}\r\n"
        "Date: Tue, 24 Nov 2026 10:00:00 +0200\r\n"
        + (f"Message-ID: {message_id}\r\n" if message_id else "")
        + extra_headers
        + "MIME-Version: 1.0\r\n"
        f"Content-Type: {content_type}\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
    )
    return headers.encode("latin-1") + body


def email_with_attachment(
    disposition: str, content: bytes = PDF_BYTES, message_id: str = "<att-1@pohjolankone.fi>"
) -> bytes:
    encoded = base64.encodebytes(content).decode("ascii")
    return (
        "From: Matti Virtanen <matti.virtanen@pohjolankone.fi>\r\n"
        "To: crm@myyntitalo.fi\r\n"
        "Subject: Liite\r\n"
        "Date: Tue, 24 Nov 2026 10:00:00 +0200\r\n"
        f"Message-ID: {message_id}\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="BOUNDARY"\r\n'
        "\r\n"
        "--BOUNDARY\r\n"
        'Content-Type: text/plain; charset="utf-8"\r\n'
        "\r\n"
        "Liitteena tiedosto.\r\n"
        "--BOUNDARY\r\n"
        "Content-Type: application/pdf\r\n"
        "Content-Transfer-Encoding: base64\r\n"
        f"Content-Disposition: {disposition}\r\n"
        "\r\n"
        f"{encoded}"
        "--BOUNDARY--\r\n"
    ).encode("ascii")


# -- the samples (examples/SAMPLES.md) ----------------------------------------------------------


def test_forwarded_memo_rfc822(world: Session, ctx: StageContext) -> None:
    event = ingest_raw(world, ctx, sample("forwarded-memo-rfc822.eml"))
    assert event["customer_number"] == "10001"
    assert event["contact"] == "Matti Virtanen"
    assert event["seller"] == "anna"
    # The time of the original email, not of the forward (09:05).
    assert event["occurred_at"] == "2026-11-20T08:41:03+02:00"
    assert datetime.fromisoformat(event["occurred_at"]) == datetime.fromisoformat(
        "2026-11-20T08:41:03+02:00"
    )
    pdfs = [d for d in event["documents"] if d["filename"] == "Laiteluettelo_kevät_2027.pdf"]
    assert len(pdfs) == 1
    assert pdfs[0]["media_type"] == "application/pdf"
    assert pdfs[0]["sha256"] is not None
    # Anna's own text is kept: as a memo document and at the start of the body.
    memos = documents(event, "memo")
    assert len(memos) == 1
    memo_text = read_blob(world, ctx.settings, memos[0]["sha256"])
    assert memo_text is not None
    assert memo_text.decode("utf-8").startswith("Muistio: soitin Matille")
    assert event["body"].startswith("Muistio: soitin Matille, tarjous lähtee 1.12. mennessä.")
    # The original's ISO-8859-1 body is decoded, not mangled.
    assert "pyydämme tarjousta" in event["body"]
    assert event["subject"] == "Tarjouspyyntö: huoltosopimus 2027"


def test_forwarded_inline_outlook_fi(world: Session, ctx: StageContext) -> None:
    event = ingest_raw(world, ctx, sample("forwarded-inline-outlook-fi.eml"))
    assert event["customer_number"] == "10002"
    assert event["contact"] == "Jussi Mäkinen"
    assert event["seller"] == "mikko"
    assert event["subject"] == "Toimitusaika"
    # "maanantai 23. marraskuuta 2026 14.02" in Helsinki time, the original's time.
    assert event["occurred_at"] == "2026-11-23T14:02:00+02:00"
    assert event["body"].startswith("Tiedoksi CRM:ään, lupasin vastata huomenna.")


def test_bcc_offer_with_pdf_same_thread_as_forwarded_memo(
    world: Session, ctx: StageContext
) -> None:
    offer = ingest_raw(world, ctx, sample("bcc-offer-with-pdf.eml"))
    assert offer["customer_number"] == "10001"
    assert offer["contact"] == "Matti Virtanen"
    assert set(offer["contacts"]) == {"Matti Virtanen", "Liisa Korhonen"}
    assert offer["seller"] == "anna"
    pdfs = [d for d in offer["documents"] if d["filename"] == "Tarjous_2026-118.pdf"]
    assert len(pdfs) == 1 and pdfs[0]["media_type"] == "application/pdf"
    memo = ingest_raw(world, ctx, sample("forwarded-memo-rfc822.eml"))
    assert offer["thread_key"] is not None
    assert offer["thread_key"] == memo["thread_key"]


def test_auto_reply_is_rejected_as_such(world: Session, ctx: StageContext) -> None:
    with pytest.raises(BadInput) as caught:
        ingest_email(world, ctx, wrap(sample("auto-reply.eml"), ctx))
    assert "auto-reply" in caught.value.reason
    assert email_count(world) == 0


def test_plus_address_visit_memo(world: Session, ctx: StageContext) -> None:
    event = ingest_raw(world, ctx, sample("plus-address-visit-memo.eml"))
    assert event["category"] == "customer_visit"
    assert (event["class"], event["type"]) == ("sales", "customer_visit")
    assert event["customer_number"] == "10001"
    assert event["seller"] == "anna"


@pytest.mark.parametrize(
    "name",
    [
        "forwarded-memo-rfc822.eml",
        "forwarded-inline-outlook-fi.eml",
        "bcc-offer-with-pdf.eml",
        "plus-address-visit-memo.eml",
    ],
)
def test_raw_bytes_always_kept(world: Session, ctx: StageContext, name: str) -> None:
    raw = sample(name)
    event = ingest_raw(world, ctx, raw)
    raws = documents(event, "raw_message")
    assert len(raws) == 1
    assert raws[0]["sha256"] == hashlib.sha256(raw).hexdigest()
    assert raws[0]["size"] == len(raw)
    assert read_blob(world, ctx.settings, raws[0]["sha256"]) == raw


# -- idempotency ---------------------------------------------------------------------------------


def test_same_email_twice_is_one_event(world: Session, ctx: StageContext) -> None:
    message = wrap(sample("bcc-offer-with-pdf.eml"), ctx)
    first = ingest_email(world, ctx, message)
    second = ingest_email(world, ctx, message)
    assert (first.outcome, second.outcome) == ("stored", "duplicate")
    assert second.event_id == first.event_id  # the outcome points at the one event
    assert email_count(world) == 1


def test_same_message_id_through_two_mailboxes_is_one_event(
    world: Session, ctx: StageContext
) -> None:
    raw = sample("bcc-offer-with-pdf.eml")
    relayed = b"Received: from mx2.myyntitalo.fi by crm; Wed, 25 Nov 2026 15:12:05 +0200\r\n" + raw
    first = ingest_email(world, ctx, wrap(raw, ctx))
    second = ingest_email(world, ctx, wrap(relayed, ctx))
    assert first.outcome == "stored"
    assert second.outcome == "duplicate"
    assert second.event_id == first.event_id
    assert email_count(world) == 1
    # Nothing counted twice: the second delivery touched no tallies.
    assert second.sellers_to_refresh == set()


def test_email_without_message_id_is_identified_by_its_hash(
    world: Session, ctx: StageContext
) -> None:
    raw = simple_email(message_id=None)
    result = ingest_email(world, ctx, wrap(raw, ctx))
    assert result.outcome == "stored"
    event = event_json(world, result.event_id, ctx)
    assert event["source_id"] == f"sha256:{hashlib.sha256(raw).hexdigest()}"
    assert event["customer_number"] == "10001"
    assert "no Message-ID" in event["match_note"]
    assert ingest_email(world, ctx, wrap(raw, ctx)).outcome == "duplicate"
    assert email_count(world) == 1


# -- attachments and filenames --------------------------------------------------------------------


def test_path_traversal_filename_is_stored_as_basename(world: Session, ctx: StageContext) -> None:
    raw = email_with_attachment('attachment; filename="../../etc/passwd"')
    event = ingest_raw(world, ctx, raw)
    (attachment,) = documents(event, "attachment")
    assert attachment["filename"] == "passwd"
    assert "sanitised" in attachment["note"]


def test_filename_with_nul_and_slash_is_sanitised(world: Session, ctx: StageContext) -> None:
    # RFC 2231 lets a sender put any byte in a filename: here a NUL and a slash.
    raw = email_with_attachment("attachment; filename*=utf-8''tarjous%00evil%2Fname.pdf")
    event = ingest_raw(world, ctx, raw)
    (attachment,) = documents(event, "attachment")
    name = attachment["filename"]
    assert name
    assert "\x00" not in name and "/" not in name and "\\" not in name
    assert name not in {".", ".."}
    assert name.endswith(".pdf")
    assert attachment["sha256"] == hashlib.sha256(PDF_BYTES).hexdigest()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("../../etc/passwd", "passwd"),
        ("..\\..\\windows\\system32\\x.dll", "x.dll"),
        ("a\x00b.pdf", "a_b.pdf"),
        ("evil\x00/..", "document"),
        ("", "document"),
        (None, "document"),
        ("....", "document"),
        ("Laiteluettelo_kevät_2027.pdf", "Laiteluettelo_kevät_2027.pdf"),
        # A right-to-left override shows "\u202egnp.exe" as "exe.png": removed, with every
        # other invisible format character but the joiners real names need.
        ("\u202egnp.exe", "gnp.exe"),
        ("kuva\u202e\u2066gpj.exe", "kuvagpj.exe"),
        ("a\u200bb\ufeff.pdf", "ab.pdf"),
        ("👩\u200d💻.png", "👩\u200d💻.png"),
        ("line\u2028break\x85.txt", "line_break_.txt"),
        # Names Windows keeps for devices, with any extension.
        ("CON", "_CON"),
        ("nul.txt", "_nul.txt"),
        ("Com1.tar.gz", "_Com1.tar.gz"),
        ("LPT9 .log", "_LPT9 .log"),
        ("CONSOLE.txt", "CONSOLE.txt"),
    ],
)
def test_sanitise_filename(raw: str | None, expected: str) -> None:
    assert sanitise_filename(raw) == expected


def test_long_filename_keeps_its_extension() -> None:
    name = sanitise_filename("x" * 500 + ".pdf")
    assert len(name) <= 200
    assert name.endswith(".pdf")


def test_attachment_over_the_cap_becomes_a_stub(world: Session, ctx: StageContext) -> None:
    small = StageContext(
        dataclasses.replace(ctx.settings, max_attachment_bytes=100), task_id="small-cap"
    )
    content = PDF_BYTES * 10
    raw = email_with_attachment('attachment; filename="iso.pdf"', content=content)
    event = ingest_raw(world, small, raw)
    (stub,) = [d for d in event["documents"] if d["filename"] == "iso.pdf"]
    assert stub["sha256"] is None
    assert stub["size"] == len(content)
    assert "not stored" in stub["note"]
    assert "100-byte" in stub["note"]
    assert world.get(DocumentBlob, hashlib.sha256(content).hexdigest()) is None
    # The raw message is capped by max_email_bytes, not the attachment cap: it is still kept.
    (raw_document,) = documents(event, "raw_message")
    assert raw_document["sha256"] == hashlib.sha256(raw).hexdigest()


# -- charsets ------------------------------------------------------------------------------------


def test_iso_8859_1_encoded_subject_is_decoded(world: Session, ctx: StageContext) -> None:
    raw = simple_email(subject="=?iso-8859-1?q?Tarjouspyynt=F6?=")
    event = ingest_raw(world, ctx, raw)
    assert event["subject"] == "Tarjouspyyntö"


def test_iso_8859_1_body_is_decoded(world: Session, ctx: StageContext) -> None:
    raw = simple_email(
        content_type='text/plain; charset="iso-8859-1"',
        body="Hyvää päivää, pyydämme tarjousta.\n".encode("iso-8859-1"),
    )
    event = ingest_raw(world, ctx, raw)
    assert event["body"] == "Hyvää päivää, pyydämme tarjousta."


def test_unknown_charset_is_stored_with_a_note(world: Session, ctx: StageContext) -> None:
    raw = simple_email(
        content_type='text/plain; charset="x-unknown"',
        body="Hei, tässä tekstiä.\n".encode(),
    )
    event = ingest_raw(world, ctx, raw)
    assert event["customer_number"] == "10001"
    assert "Hei, t" in event["body"]
    assert "x-unknown" in event["match_note"]
    assert len(documents(event, "raw_message")) == 1


# -- malformed input never loses the email --------------------------------------------------------

MATTI_HEADERS = (
    b"From: Matti Virtanen <matti.virtanen@pohjolankone.fi>\r\n"
    b"To: crm@myyntitalo.fi\r\n"
    b"Date: Tue, 24 Nov 2026 10:00:00 +0200\r\n"
    b"Message-ID: <nul-1@pohjolankone.fi>\r\n"
)


@pytest.mark.parametrize(
    ("raw", "subject", "body"),
    [
        pytest.param(
            MATTI_HEADERS + b"Subject: a\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            b"hei\x00maailma\r\n",
            "a",
            "heimaailma",
            id="8bit-body",
        ),
        pytest.param(
            MATTI_HEADERS + b"Subject: a\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\nhei=00maailma\r\n",
            "a",
            "heimaailma",
            id="quoted-printable-body",
        ),
        pytest.param(
            MATTI_HEADERS + b"Subject: a\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n"
            + base64.b64encode("Hei".encode("utf-16-le"))
            + b"\r\n",
            "a",
            "Hei",
            id="utf-16-labelled-utf-8",
        ),
        pytest.param(
            MATTI_HEADERS + b"Subject: =?utf-8?q?Tarjous=00pyynt=C3=B6?=\r\n"
            b"Content-Type: text/plain\r\n\r\nbody\r\n",
            "Tarjouspyyntö",
            "body",
            id="encoded-subject",
        ),
        pytest.param(
            MATTI_HEADERS + b"Subject: a\r\nIn-Reply-To: <r\x00@x>\r\n"
            b"Content-Type: text/plain\r\n\r\nbody\r\n",
            "a",
            "body",
            id="in-reply-to",
        ),
    ],
)
def test_nul_characters_are_dropped_not_fatal(
    world: Session, ctx: StageContext, raw: bytes, subject: str, body: str
) -> None:
    # PostgreSQL text cannot hold NUL: before the fix these failed with a DataError.
    event = ingest_raw(world, ctx, raw)
    assert event["subject"] == subject
    assert event["body"] == body
    assert event["customer_number"] == "10001"
    assert "NUL characters removed" in event["match_note"]
    (raw_document,) = documents(event, "raw_message")
    assert read_blob(world, ctx.settings, raw_document["sha256"]) == raw


def test_nul_in_an_inline_forward_is_dropped(world: Session, ctx: StageContext) -> None:
    raw = (
        b"From: Anna Lahtinen <anna.lahtinen@myyntitalo.fi>\r\n"
        b"To: crm@myyntitalo.fi\r\n"
        b"Subject: Fwd: kysely\r\n"
        b"Date: Tue, 24 Nov 2026 11:00:00 +0200\r\n"
        b"Message-ID: <nul-fwd@myyntitalo.fi>\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"\r\n"
        b"Muistio\x00: soitan huomenna.\r\n"
        b"\r\n"
        b"---------- Forwarded message ---------\r\n"
        b"From: Matti Virtanen <matti.virtanen@pohjolankone.fi>\r\n"
        b"Date: Tue, 24 Nov 2026 10:00:00 +0200\r\n"
        b"Subject: kysely\x00\r\n"
        b"\r\n"
        b"Alkuper\xc3\xa4inen\x00 viesti\r\n"
    )
    event = ingest_raw(world, ctx, raw)
    assert event["subject"] == "kysely"
    assert event["body"] == "Muistio: soitan huomenna.\n\nAlkuperäinen viesti"
    assert (event["customer_number"], event["contact"], event["seller"]) == (
        "10001",
        "Matti Virtanen",
        "anna",
    )


def test_bytes_that_are_not_an_email_are_still_kept(world: Session, ctx: StageContext) -> None:
    raw = b"\x00\x01\x02 not an email at all"
    event = ingest_raw(world, ctx, raw)
    assert event["customer_number"] is None
    assert event["source_id"] == f"sha256:{hashlib.sha256(raw).hexdigest()}"
    (raw_document,) = documents(event, "raw_message")
    assert read_blob(world, ctx.settings, raw_document["sha256"]) == raw


def test_html_only_email_becomes_readable_text(world: Session, ctx: StageContext) -> None:
    raw = simple_email(
        content_type='text/html; charset="utf-8"',
        body=b"<html><head><style>p {color: red}</style></head><body><p>Hei</p>"
        b"<p>T&auml;ss&auml; <b>viesti</b></p><script>alert(1)</script></body></html>",
    )
    event = ingest_raw(world, ctx, raw)
    assert event["body"] == "Hei\n\nTässä viesti"
    assert "HTML" in event["match_note"]


def test_missing_date_uses_the_time_received(world: Session, ctx: StageContext) -> None:
    raw = simple_email().replace(b"Date: Tue, 24 Nov 2026 10:00:00 +0200\r\n", b"")
    message = {**wrap(raw, ctx), "received_at": "2026-11-24T10:05:00+02:00"}
    result = ingest_email(world, ctx, message)
    event = event_json(world, result.event_id, ctx)
    assert event["occurred_at"] == "2026-11-24T10:05:00+02:00"
    assert "time received" in event["match_note"]


def test_customer_email_goes_to_the_customers_seller(world: Session, ctx: StageContext) -> None:
    event = ingest_raw(world, ctx, simple_email())
    assert (event["customer_number"], event["contact"], event["seller"]) == (
        "10001",
        "Matti Virtanen",
        "anna",
    )
    assert event["occurred_at"] == "2026-11-24T10:00:00+02:00"
    assert event["category"] == "crm_event"
