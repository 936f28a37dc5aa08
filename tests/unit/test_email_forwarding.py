"""Forwarded memos in every form the mail clients produce, in Finnish and in English.

Mikko (staff) forwards Matti's (customer 10001, whose responsible seller is anna) email to the
CRM address with a line of his own. Whatever the client, the event must be Matti's email to us
at the original's time, assigned to mikko (who handled it), with mikko's line kept as the memo.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest
from sqlalchemy.orm import Session

from tasks.attach import read_blob
from tasks.context import StageContext
from tests.unit.test_samples_emails import PDF_BYTES, documents, ingest_raw

MATTI = "Matti Virtanen <matti.virtanen@pohjolankone.fi>"
MIKKO = "Mikko Nieminen <mikko.nieminen@myyntitalo.fi>"
ORIGINAL_TIME = "2026-11-24T10:00:00+02:00"

MEMO = {
    "fi": "Tiedoksi: lupasin tarjouksen perjantaiksi.",
    "en": "FYI: I promised them an offer by Friday.",
}
ORIGINAL_TEXT = {
    "fi": "Hei Mikko,\n\nmilloin huoltokäynti sopisi? Kone pitää ääntä.\n\nMatti",
    "en": "Hi Mikko,\n\nwhen could the service visit be? The machine is noisy.\n\nMatti",
}

#: The block each client puts between the forwarder's text and the original's text.
FORWARD_BLOCKS: dict[str, tuple[str, str]] = {
    "gmail-en": (
        "en",
        "---------- Forwarded message ---------\n"
        f"From: {MATTI}\n"
        "Date: Tue, Nov 24, 2026 at 10:00 AM\n"
        "Subject: Huoltosopimus\n"
        f"To: {MIKKO}\n",
    ),
    "gmail-fi": (
        "fi",
        "---------- Välitetty viesti ---------\n"
        f"Lähettäjä: {MATTI}\n"
        "Date: ti 24.11.2026 klo 10.00\n"
        "Subject: Huoltosopimus\n"
        f"To: {MIKKO}\n",
    ),
    "outlook-en-original-message": (
        "en",
        "-----Original Message-----\n"
        "From: Matti Virtanen [mailto:matti.virtanen@pohjolankone.fi]\n"
        "Sent: Tuesday, November 24, 2026 10:00 AM\n"
        "To: Mikko Nieminen\n"
        "Subject: Huoltosopimus\n",
    ),
    "outlook-en-header-block": (
        "en",
        "________________________________\n"
        f"From: {MATTI}\n"
        "Sent: Tuesday, November 24, 2026 10:00\n"
        f"To: {MIKKO}\n"
        "Cc: Liisa Korhonen <liisa.korhonen@pohjolankone.fi>\n"
        "Subject: Huoltosopimus\n",
    ),
    "outlook-fi-alkuperainen-viesti": (
        "fi",
        "-----Alkuperäinen viesti-----\n"
        "Lähettäjä: Matti Virtanen [mailto:matti.virtanen@pohjolankone.fi]\n"
        "Lähetetty: 24. marraskuuta 2026 10:00\n"
        "Vastaanottaja: Mikko Nieminen\n"
        "Aihe: Huoltosopimus\n",
    ),
    "outlook-fi-header-block": (
        "fi",
        "________________________________\n"
        f"Lähettäjä: {MATTI}\n"
        "Lähetetty: tiistai 24. marraskuuta 2026 10.00\n"
        f"Vastaanottaja: {MIKKO}\n"
        "Kopio: Liisa Korhonen <liisa.korhonen@pohjolankone.fi>\n"
        "Aihe: Huoltosopimus\n",
    ),
    "apple-mail-en": (
        "en",
        "Begin forwarded message:\n\n"
        f"From: {MATTI}\n"
        "Subject: Huoltosopimus\n"
        "Date: 24 November 2026 at 10.00.00 EET\n"
        f"To: {MIKKO}\n",
    ),
    "apple-mail-fi": (
        "fi",
        "Välitetty viesti alkaa:\n\n"
        f"Lähettäjä: {MATTI}\n"
        "Aihe: Huoltosopimus\n"
        "Päivämäärä: 24. marraskuuta 2026 klo 10.00.00 UTC+2\n"
        f"Vastaanottaja: {MIKKO}\n",
    ),
    "thunderbird-en": (
        "en",
        "-------- Forwarded Message --------\n"
        "Subject: \tHuoltosopimus\n"
        "Date: \tTue, 24 Nov 2026 10:00:00 +0200\n"
        f"From: \t{MATTI}\n"
        f"To: \t{MIKKO}\n",
    ),
    "thunderbird-fi": (
        "fi",
        "-------- Välitetty viesti --------\n"
        "Aihe: \tHuoltosopimus\n"
        "Päiväys: \tTue, 24 Nov 2026 10:00:00 +0200\n"
        f"Lähettäjä: \t{MATTI}\n"
        f"Vastaanottaja: \t{MIKKO}\n",
    ),
}


def forward_headers(message_id: str, subject: str = "VL: Huoltosopimus") -> str:
    return (
        f"From: {MIKKO}\r\n"
        "To: crm@myyntitalo.fi\r\n"
        f"Subject: {subject}\r\n"
        "Date: Tue, 24 Nov 2026 11:30:00 +0200\r\n"
        f"Message-ID: <{message_id}>\r\n"
        "MIME-Version: 1.0\r\n"
    )


def inline_forward(form: str) -> bytes:
    language, block = FORWARD_BLOCKS[form]
    body = f"{MEMO[language]}\n\n{block}\n{ORIGINAL_TEXT[language]}\n"
    return (
        forward_headers(f"fwd-{form}@myyntitalo.fi")
        + 'Content-Type: text/plain; charset="utf-8"\r\n'
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n" + body.replace("\n", "\r\n")
    ).encode("utf-8")


def assert_forwarded_memo(
    world: Session, ctx: StageContext, event: dict[str, Any], language: str
) -> None:
    assert (event["customer_number"], event["contact"]) == ("10001", "Matti Virtanen")
    # mikko handled it: he is the assigned seller, not the customer's responsible seller anna.
    assert event["seller"] == "mikko"
    assert event["occurred_at"] == ORIGINAL_TIME
    assert event["subject"] == "Huoltosopimus"
    assert event["direction"] == "inbound"
    assert "forwarded by mikko" in event["match_note"]
    assert event["body"].startswith(MEMO[language])
    assert ORIGINAL_TEXT[language].split("\n")[-3] in event["body"]
    (memo,) = documents(event, "memo")
    stored = read_blob(world, ctx.settings, memo["sha256"])
    assert stored is not None and stored.decode("utf-8") == MEMO[language]


@pytest.mark.parametrize("form", sorted(FORWARD_BLOCKS))
def test_inline_forward(world: Session, ctx: StageContext, form: str) -> None:
    event = ingest_raw(world, ctx, inline_forward(form))
    assert_forwarded_memo(world, ctx, event, FORWARD_BLOCKS[form][0])


def original_email(language: str, *, attachment: bytes | None = None) -> str:
    subject = "Huoltosopimus"
    headers = (
        f"From: {MATTI}\r\n"
        f"To: {MIKKO}\r\n"
        f"Subject: {subject}\r\n"
        "Date: Tue, 24 Nov 2026 10:00:00 +0200\r\n"
        f"Message-ID: <original-{language}@pohjolankone.fi>\r\n"
        "MIME-Version: 1.0\r\n"
    )
    text = ORIGINAL_TEXT[language].replace("\n", "\r\n")
    if attachment is None:
        return headers + 'Content-Type: text/plain; charset="utf-8"\r\n\r\n' + text + "\r\n"
    return (
        headers + 'Content-Type: multipart/mixed; boundary="inner"\r\n\r\n'
        "--inner\r\n"
        'Content-Type: text/plain; charset="utf-8"\r\n\r\n'
        f"{text}\r\n"
        "--inner\r\n"
        "Content-Type: application/pdf\r\n"
        "Content-Transfer-Encoding: base64\r\n"
        "Content-Disposition: attachment; filename*=utf-8''Laiteluettelo_kev%C3%A4t.pdf\r\n\r\n"
        + base64.encodebytes(attachment).decode("ascii").replace("\n", "\r\n")
        + "--inner--\r\n"
    )


def attached_forward(language: str, inner: str, message_id: str) -> bytes:
    return (
        forward_headers(
            message_id, "Fwd: Huoltosopimus" if language == "en" else "VL: Huoltosopimus"
        )
        + 'Content-Type: multipart/mixed; boundary="outer"\r\n\r\n'
        "--outer\r\n"
        'Content-Type: text/plain; charset="utf-8"\r\n\r\n'
        f"{MEMO[language]}\r\n"
        "--outer\r\n"
        "Content-Type: message/rfc822\r\n"
        'Content-Disposition: attachment; filename="Huoltosopimus.eml"\r\n\r\n'
        f"{inner}"
        "--outer--\r\n"
    ).encode("utf-8")


@pytest.mark.parametrize("language", ["fi", "en"])
def test_forward_as_an_attached_message(world: Session, ctx: StageContext, language: str) -> None:
    raw = attached_forward(language, original_email(language), f"att-{language}@myyntitalo.fi")
    event = ingest_raw(world, ctx, raw)
    assert_forwarded_memo(world, ctx, event, language)


def test_nested_forwarded_email_keeps_its_own_attachment(world: Session, ctx: StageContext) -> None:
    # anna forwards mikko's forward (as attachments, twice nested) of Matti's email with a PDF.
    inner = attached_forward("fi", original_email("fi", attachment=PDF_BYTES), "mikko-fwd@x.fi")
    raw = (
        "From: Anna Lahtinen <anna.lahtinen@myyntitalo.fi>\r\n"
        "To: crm@myyntitalo.fi\r\n"
        "Subject: VL: VL: Huoltosopimus\r\n"
        "Date: Tue, 24 Nov 2026 12:00:00 +0200\r\n"
        "Message-ID: <anna-fwd@myyntitalo.fi>\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="top"\r\n\r\n'
        "--top\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nMikon välittämä, hoidan.\r\n"
        "--top\r\nContent-Type: message/rfc822\r\n\r\n" + inner.decode("utf-8") + "--top--\r\n"
    ).encode("utf-8")
    event = ingest_raw(world, ctx, raw)
    assert (event["customer_number"], event["contact"]) == ("10001", "Matti Virtanen")
    assert event["seller"] == "anna"
    # Both colleagues in the chain have been in touch.
    assert set(event["staff"]) == {"anna", "mikko"}
    assert event["occurred_at"] == ORIGINAL_TIME
    (pdf,) = documents(event, "attachment")
    assert pdf["filename"] == "Laiteluettelo_kevät.pdf"
    assert pdf["media_type"] == "application/pdf"


def test_html_only_outlook_forward(world: Session, ctx: StageContext) -> None:
    html = (
        "<html><body><div><p>Tiedoksi: lupasin tarjouksen perjantaiksi.</p></div>"
        '<div style="border-top:solid #E1E1E1 1pt"><p><b>Lähettäjä:</b> Matti Virtanen '
        "&lt;matti.virtanen@pohjolankone.fi&gt;<br><b>Lähetetty:</b> tiistai 24. marraskuuta"
        " 2026 10.00<br><b>Vastaanottaja:</b> Mikko Nieminen &lt;mikko.nieminen@myyntitalo.fi"
        "&gt;<br><b>Aihe:</b> Huoltosopimus</p></div>"
        "<p>Hei Mikko,</p><p>milloin huoltokäynti sopisi? Kone pitää ääntä.</p><p>Matti</p>"
        "<img src='https://tracker.example/p.gif'><script>alert(1)</script></body></html>"
    )
    raw = (
        forward_headers("html-fwd@myyntitalo.fi")
        + 'Content-Type: text/html; charset="utf-8"\r\nContent-Transfer-Encoding: 8bit\r\n\r\n'
        + html
    ).encode("utf-8")
    event = ingest_raw(world, ctx, raw)
    assert_forwarded_memo(world, ctx, event, "fi")
    assert "<" not in event["body"] and "alert" not in event["body"]


def test_staff_bcc_assigns_the_sender_and_matches_the_recipients(
    world: Session, ctx: StageContext
) -> None:
    raw = (
        "From: Mikko Nieminen <mikko.nieminen@myyntitalo.fi>\r\n"
        "To: Jussi Mäkinen <jussi.makinen@jsahko.fi>\r\n"
        "Subject: Offer for the sensors\r\n"
        "Date: Tue, 24 Nov 2026 10:00:00 +0200\r\n"
        "Message-ID: <bcc-en@myyntitalo.fi>\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\n"
        "Hi Jussi, the offer is attached.\r\n"
    ).encode()
    # The CRM address is only in the envelope: the mail was BCC'd to us.
    event = ingest_raw(world, ctx, raw)
    assert (event["customer_number"], event["contact"], event["seller"]) == (
        "10002",
        "Jussi Mäkinen",
        "mikko",
    )
    assert event["direction"] == "outbound"
    assert "sent by staff" in event["match_note"]
