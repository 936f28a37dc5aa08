"""Finnish text (ä, ö, å, €) in ISO-8859-1, ISO-8859-15, Windows-1252 and UTF-8: in the subject,
the body and attachment names, encoded as mail clients actually send them."""

from __future__ import annotations

import base64
import urllib.parse

import pytest
from sqlalchemy.orm import Session

from tasks.context import StageContext
from tasks.ingest.email_parse import decode_text
from tests.unit.test_samples_emails import PDF_BYTES, documents, ingest_raw

#: Per charset, a subject and a file name it can carry (ISO-8859-1 has no €).
TEXTS = {
    "iso-8859-1": ("Tarjouspyyntö: Åland-huolto, hyvää päivää", "Käyntiraportti Åland"),
    "iso-8859-15": ("Hinta 1 200 € (alv 0 %), öljyt ja Åland", "Hinnasto € öljyt"),
    "windows-1252": ("Hinta 1 200 € – öljyt ja Åland", "Hinnasto – € ä"),
    "utf-8": ("Hinta 1 200 € – öljyt ja Åland", "Hinnasto – € ä"),
}
BODY = "Hyvää päivää,\n\nlähetämme tarjouksen: {subject}.\n\nYstävällisin terveisin\nÅsa Öberg"


def q_word(text: str, charset: str) -> str:
    octets = text.encode(charset)
    encoded = "".join(
        chr(b) if (chr(b).isalnum() and b < 128) else ("_" if b == 32 else f"={b:02X}")
        for b in octets
    )
    return f"=?{charset}?Q?{encoded}?="


def b_word(text: str, charset: str) -> str:
    return f"=?{charset}?B?{base64.b64encode(text.encode(charset)).decode('ascii')}?="


def email(
    charset: str,
    subject_header: bytes,
    filename_parameter: bytes,
    *,
    label: str | None = None,
    message_id: str,
) -> bytes:
    subject = TEXTS[charset][0]
    body = BODY.format(subject=subject).replace("\n", "\r\n").encode(charset)
    return (
        b"From: Matti Virtanen <matti.virtanen@pohjolankone.fi>\r\n"
        b"To: crm@myyntitalo.fi\r\n"
        b"Subject: " + subject_header + b"\r\n"
        b"Date: Tue, 24 Nov 2026 10:00:00 +0200\r\n"
        b"Message-ID: <" + message_id.encode() + b">\r\n"
        b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\n"
        b'Content-Type: text/plain; charset="' + (label or charset).encode() + b'"\r\n'
        b"Content-Transfer-Encoding: 8bit\r\n\r\n" + body + b"\r\n"
        b"--b\r\n"
        b"Content-Type: application/pdf\r\n"
        b"Content-Transfer-Encoding: base64\r\n"
        b"Content-Disposition: attachment; "
        + filename_parameter
        + b"\r\n\r\n"
        + base64.encodebytes(PDF_BYTES).replace(b"\n", b"\r\n")
        + b"--b--\r\n"
    )


def assert_finnish(event: dict, charset: str) -> None:
    subject, name = TEXTS[charset]
    assert event["subject"] == subject
    assert event["body"] == BODY.format(subject=subject)
    (attachment,) = documents(event, "attachment")
    assert attachment["filename"] == f"{name}.pdf"
    assert attachment["media_type"] == "application/pdf"
    assert event["customer_number"] == "10001"


@pytest.mark.parametrize("charset", sorted(TEXTS))
def test_rfc2047_subject_and_rfc2231_filename(
    world: Session, ctx: StageContext, charset: str
) -> None:
    subject, name = TEXTS[charset]
    quoted = urllib.parse.quote(f"{name}.pdf".encode(charset), safe="")
    raw = email(
        charset,
        q_word(subject, charset).encode("ascii"),
        f"filename*={charset}''{quoted}".encode("ascii"),
        message_id=f"rfc2231-{charset}@x.fi",
    )
    assert_finnish(ingest_raw(world, ctx, raw), charset)


@pytest.mark.parametrize("charset", sorted(TEXTS))
def test_base64_words_in_subject_and_filename(
    world: Session, ctx: StageContext, charset: str
) -> None:
    # Outlook and many webmails put an RFC 2047 word inside the quoted filename.
    subject, name = TEXTS[charset]
    raw = email(
        charset,
        b_word(subject, charset).encode("ascii"),
        f'filename="{b_word(name + ".pdf", charset)}"'.encode("ascii"),
        message_id=f"rfc2047-{charset}@x.fi",
    )
    assert_finnish(ingest_raw(world, ctx, raw), charset)


@pytest.mark.parametrize("charset", sorted(TEXTS))
def test_raw_8bit_subject_and_filename(world: Session, ctx: StageContext, charset: str) -> None:
    # No encoding at all: 8-bit bytes straight in the headers, as old mailers send them.
    subject, name = TEXTS[charset]
    raw = email(
        charset,
        subject.encode(charset),
        b'filename="' + f"{name}.pdf".encode(charset) + b'"',
        message_id=f"raw8bit-{charset}@x.fi",
    )
    assert_finnish(ingest_raw(world, ctx, raw), charset)


def test_windows_1252_labelled_iso_8859_1_keeps_the_euro(world: Session, ctx: StageContext) -> None:
    # The most common lie: € (0x80 in Windows-1252) in a part labelled ISO-8859-1.
    raw = email(
        "windows-1252",
        q_word(TEXTS["windows-1252"][0], "windows-1252").encode("ascii"),
        b'filename="Hinnasto.pdf"',
        label="iso-8859-1",
        message_id="lying-label@x.fi",
    )
    event = ingest_raw(world, ctx, raw)
    assert "1 200 € – öljyt" in event["body"]


def test_utf8_labelled_iso_8859_1_is_read_as_utf8(world: Session, ctx: StageContext) -> None:
    raw = email(
        "utf-8",
        q_word(TEXTS["utf-8"][0], "utf-8").encode("ascii"),
        b'filename="Hinnasto.pdf"',
        label="iso-8859-1",
        message_id="utf8-as-latin1@x.fi",
    )
    event = ingest_raw(world, ctx, raw)
    assert event["body"] == BODY.format(subject=TEXTS["utf-8"][0])
    assert "labelled iso-8859-1 is UTF-8" in event["match_note"]


@pytest.mark.parametrize(
    ("data", "label", "expected"),
    [
        ("Hyvää päivää €".encode("iso-8859-15"), "iso-8859-15", "Hyvää päivää €"),
        ("Hyvää päivää €".encode("cp1252"), "windows-1252", "Hyvää päivää €"),
        ("Hyvää päivää €".encode("cp1252"), "us-ascii", "Hyvää päivää €"),
        ("Hyvää päivää €".encode("cp1252"), None, "Hyvää päivää €"),
        ("Hyvää päivää €".encode(), None, "Hyvää päivää €"),
        ("Hyvää päivää €".encode(), "x-no-such-charset", "Hyvää päivää €"),
        ("Hyvää".encode("cp1252"), "base64", "Hyvää"),  # a codec, but not a text encoding
        (b"abc\x81\x8d", "windows-1252", "abc\x81\x8d"),  # bytes Windows-1252 leaves undefined
    ],
)
def test_decode_text_never_raises(data: bytes, label: str | None, expected: str) -> None:
    assert decode_text(data, label, []) == expected
