"""Hostile and oversized structure: the caps from config hold before the parser does any work,
and what can be read is still stored with a note, the raw bytes always kept."""

from __future__ import annotations

import base64
import dataclasses
import email
import email.policy
import hashlib
import time
from collections.abc import Callable
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy.orm import Session

from tasks.attach import read_blob, store_blob
from tasks.context import StageContext
from tasks.errors import BadInput
from tasks.ingest.email import ingest_email
from tasks.ingest.email_parse import ParseLimits, html_to_text, parse_email, scan_structure
from tests.conftest import statements_run
from tests.unit.test_samples_emails import (
    PDF_BYTES,
    documents,
    event_json,
    ingest_raw,
    simple_email,
    wrap,
)

ZONE = ZoneInfo("Europe/Helsinki")
HEADERS = (
    "From: Matti Virtanen <matti.virtanen@pohjolankone.fi>\r\n"
    "To: crm@myyntitalo.fi\r\n"
    "Subject: Syvä rakenne\r\n"
    "Date: Tue, 24 Nov 2026 10:00:00 +0200\r\n"
    "Message-ID: <{id}>\r\n"
    "MIME-Version: 1.0\r\n"
)


def with_settings(ctx: StageContext, **changes: Any) -> StageContext:
    return StageContext(dataclasses.replace(ctx.settings, **changes), task_id=ctx.task_id)


def nested_multipart(levels: int, message_id: str) -> bytes:
    head, tail = "", ""
    for level in range(levels):
        head += f'Content-Type: multipart/mixed; boundary="level{level}"\r\n\r\n--level{level}\r\n'
        tail = f"\r\n--level{level}--\r\n" + tail
    body = "Content-Type: text/plain; charset=utf-8\r\n\r\nsisin osa"
    return (HEADERS.format(id=message_id) + head + body + tail).encode("utf-8")


def nested_messages(levels: int, message_id: str) -> bytes:
    wrappers = "Content-Type: message/rfc822\r\n\r\n" * levels
    return (
        HEADERS.format(id=message_id) + wrappers + "Content-Type: text/plain\r\n\r\nx\r\n"
    ).encode()


def many_parts(count: int, message_id: str) -> bytes:
    parts = "".join(
        f"--b\r\nContent-Type: text/plain\r\nContent-Disposition: attachment; filename=p{i}.txt"
        f"\r\n\r\nosa {i}\r\n"
        for i in range(count)
    )
    return (
        HEADERS.format(id=message_id)
        + 'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        + parts
        + "--b--\r\n"
    ).encode()


def assert_refused_but_kept(event: dict, raw: bytes, words: str) -> None:
    # The headers are read: who, when, what about; the structure is not.
    assert (event["customer_number"], event["contact"]) == ("10001", "Matti Virtanen")
    assert event["subject"] == "Syvä rakenne"
    assert event["occurred_at"] == "2026-11-24T10:00:00+02:00"
    assert words in event["match_note"]
    assert "body and attachments were not read" in event["match_note"]
    assert documents(event, "attachment") == []
    (raw_document,) = documents(event, "raw_message")
    assert raw_document["sha256"] == hashlib.sha256(raw).hexdigest()


def test_nesting_over_the_depth_cap_is_stored_with_a_note(
    world: Session, ctx: StageContext
) -> None:
    raw = nested_multipart(21, "deep-21@x.fi")
    assert_refused_but_kept(ingest_raw(world, ctx, raw), raw, "deeper than the 20-level limit")


@pytest.mark.parametrize("build", [nested_multipart, nested_messages])
def test_absurd_nesting_costs_no_recursion_and_no_time(
    world: Session, ctx: StageContext, build: Callable[[int, str], bytes]
) -> None:
    # 5000 levels crash the standard library's parser (RecursionError); the scan stops first.
    raw = build(5000, f"deep-5000-{build.__name__}@x.fi")
    started = time.perf_counter()
    event = ingest_raw(world, ctx, raw)
    assert time.perf_counter() - started < 2
    assert_refused_but_kept(event, raw, "deeper than the 20-level limit")


def test_depth_cap_comes_from_config(world: Session, ctx: StageContext) -> None:
    raw = nested_multipart(4, "deep-4@x.fi")
    assert ingest_raw(world, ctx, raw)["body"] == "sisin osa"
    strict = with_settings(ctx, email_max_depth=3)
    raw = nested_multipart(4, "deep-4-strict@x.fi")
    assert_refused_but_kept(ingest_raw(world, strict, raw), raw, "deeper than the 3-level limit")


def test_parts_cap_comes_from_config(world: Session, ctx: StageContext) -> None:
    raw = many_parts(30, "parts-30@x.fi")
    assert len(documents(ingest_raw(world, ctx, raw), "attachment")) == 30
    strict = with_settings(ctx, email_max_parts=29)
    raw = many_parts(30, "parts-30-strict@x.fi")
    assert_refused_but_kept(ingest_raw(world, strict, raw), raw, "more than the 29-part limit")


def test_a_hundred_thousand_parts_are_refused_quickly(world: Session, ctx: StageContext) -> None:
    raw = many_parts(100_000, "parts-100k@x.fi")
    started = time.perf_counter()
    event = ingest_raw(world, ctx, raw)
    assert time.perf_counter() - started < 5  # the parser alone needs half a minute
    assert_refused_but_kept(event, raw, "more than the 1000-part limit")


def test_email_over_the_size_cap_is_rejected_with_the_reason(
    world: Session, ctx: StageContext
) -> None:
    raw = simple_email(body=b"x" * 5000)
    small = with_settings(ctx, max_email_bytes=4000)
    with pytest.raises(BadInput) as caught:
        ingest_email(world, small, wrap(raw, small))
    assert f"email of {len(raw)} bytes is over the 4000-byte limit" in caught.value.reason


def test_large_base64_bodies_decode_from_the_raw_bytes_exactly() -> None:
    pdf = b"%PDF-1.4\n" + bytes(range(256)) * 2000
    text = "Hyvää päivää €\n" * 5000
    raw = (
        HEADERS.format(id="sliced@x.fi") + 'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(text.encode()).decode().replace("\n", "\r\n")
        + "--b\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n"
        'Content-Disposition: attachment; filename="iso.pdf"\r\n\r\n'
        + base64.encodebytes(pdf).decode().replace("\n", "\r\n")
        + "--b--\r\n"
    ).encode()
    shape = scan_structure(raw, ParseLimits())
    assert len(shape.slices) == 2  # both bodies bypass the parser
    parsed = parse_email(raw, ZONE)
    assert parsed.text == text.strip()
    (attachment,) = parsed.attachments
    assert attachment.content == pdf
    # The same as the standard library's own reading of the whole message.
    reference = email.message_from_bytes(raw, policy=email.policy.default)
    assert [p.get_payload(decode=True) for p in reference.iter_attachments()] == [pdf]


def test_broken_base64_is_read_as_far_as_it_goes() -> None:
    body = base64.encodebytes(PDF_BYTES * 1000).decode().replace("\n", "\r\n")
    broken = body[:-7] + "!!\r\n"  # bad padding and characters outside the alphabet
    raw = (
        HEADERS.format(id="bad-b64@x.fi") + 'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: text/plain\r\n\r\nliite\r\n"
        "--b\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n"
        'Content-Disposition: attachment; filename="rikki.pdf"\r\n\r\n' + broken + "--b--\r\n"
    ).encode()
    (attachment,) = parse_email(raw, ZONE).attachments
    assert (PDF_BYTES * 1000).startswith(attachment.content[:1000])
    assert len(attachment.content) > 40_000


def test_structure_the_scan_misreads_falls_back_to_the_parser() -> None:
    # The boundary parameter given twice: the scan and the parser may pick differently; the
    # markers do not bind, and the whole message is parsed the ordinary way.
    pdf = bytes(range(256)) * 400
    raw = (
        HEADERS.format(id="twice@x.fi")
        + 'Content-Type: multipart/mixed; boundary="a"; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n"
        'Content-Disposition: attachment; filename="x.pdf"\r\n\r\n'
        + base64.encodebytes(pdf).decode().replace("\n", "\r\n")
        + "--b--\r\n"
    ).encode()
    parsed = parse_email(raw, ZONE)
    reference = email.message_from_bytes(raw, policy=email.policy.default)
    expected = [p.get_payload(decode=True) for p in reference.iter_attachments()]
    assert [a.content for a in parsed.attachments] == expected


def test_overlong_message_id_and_media_type_do_not_break_the_store(
    world: Session, ctx: StageContext
) -> None:
    raw = (
        HEADERS.format(id="x" * 3000 + "@x.fi")
        + 'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: text/plain\r\n\r\nteksti\r\n"
        f"--b\r\nContent-Type: application/{'y' * 600}\r\nContent-Transfer-Encoding: base64\r\n"
        'Content-Disposition: attachment; filename="a.pdf"\r\n\r\n'
        + base64.encodebytes(PDF_BYTES).decode()
        + "--b--\r\n"
    ).encode()
    event = ingest_raw(world, ctx, raw)
    assert event["source_id"].startswith("id-sha256:")
    (attachment,) = documents(event, "attachment")
    assert attachment["media_type"] == "application/pdf"  # sniffed; the declared one was junk


def test_html_attachment_is_stored_sanitised(world: Session, ctx: StageContext) -> None:
    page = (
        "<html><body onload='steal()'><h1>Tarjous</h1><p>Hinta 100 €</p>"
        "<script>steal()</script><img src=x onerror=steal()></body></html>"
    )
    raw = (
        HEADERS.format(id="html-att@x.fi") + 'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: text/plain\r\n\r\nliitteenä tarjous\r\n"
        "--b\r\nContent-Type: text/html; charset=utf-8\r\n"
        'Content-Disposition: attachment; filename="tarjous.html"\r\n\r\n' + page + "\r\n--b--\r\n"
    ).encode()
    event = ingest_raw(world, ctx, raw)
    (attachment,) = documents(event, "attachment")
    assert attachment["media_type"] == "text/html"
    assert "sanitised" in attachment["note"]
    stored = read_blob(world, ctx.settings, attachment["sha256"])
    assert stored is not None
    html = stored.decode()
    assert "Hinta 100 €" in html and "<h1>" in html
    assert "script" not in html and "onload" not in html and "onerror" not in html


def test_html_to_text_lays_out_blocks_and_survives_absurd_markup() -> None:
    text = html_to_text(
        "<table><tr><td>Tuote</td><td>Hinta</td></tr><tr><td>Anturi</td><td>12 €</td></tr>"
        "</table><ul><li>yksi</li><li>kaksi</li></ul>rivi<br>toinen&nbsp;rivi"
        "<div>Hei</div>teksti"
    )
    assert text.split("\n") == [
        "Tuote Hinta",
        "",
        "Anturi 12 €",
        "",
        "yksi",
        "",
        "kaksi",
        "rivi",
        "toinen rivi",
        "Hei",
        "teksti",
    ]
    deep = "<div>" * 20_000 + "sisältö" + "</div>" * 20_000
    started = time.perf_counter()
    assert "sisältö" in html_to_text(deep)
    assert time.perf_counter() - started < 10
    huge = "<p>" + "a" * (5 * 1024 * 1024) + "</p>"
    notes: list[str] = []
    assert html_to_text(huge, notes=notes).startswith("aaa")
    assert "tags stripped" in notes[0]


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\r\n\r\n",
        b"Content-Type: multipart/mixed; boundary=\r\n\r\n--\r\n--\r\n",
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n--b\r\n--b\r\n',
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n' + b"--b\r\n\r\n" * 2000,
        b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!",
        b'Content-Type: text/plain; charset="utf-8\x00"\r\n\r\n\xff\xfe',
        b"Subject: =?utf-8?B?" + b"A" * 100_000 + b"?=\r\n\r\nx",
        b"From: " + b"<a@b>," * 20_000 + b"\r\n\r\nx",
        b"Content-Type: multipart/digest; boundary=d\r\n\r\n"
        b"--d\r\n\r\nSubject: inner\r\n\r\nx\r\n--d--",
        b"Date: Tue, 99 Nov 99999 99:99:99 +9999\r\n\r\nx",
    ],
    ids=[
        "empty",
        "blank-lines",
        "empty-boundary",
        "unclosed-parts",
        "empty-parts",
        "base64-message",
        "bad-charset",
        "huge-encoded-word",
        "many-addresses",
        "digest",
        "absurd-date",
    ],
)
def test_malformed_mail_is_stored_never_raised(
    world: Session, ctx: StageContext, raw: bytes
) -> None:
    raw = HEADERS.format(id=f"malformed-{hashlib.sha256(raw).hexdigest()[:12]}@x.fi").encode() + raw
    started = time.perf_counter()
    event = ingest_raw(world, ctx, raw)
    assert time.perf_counter() - started < 5
    (raw_document,) = documents(event, "raw_message")
    assert raw_document["size"] == len(raw)


def test_large_mail_stored_by_the_gateway_is_read_back_exactly(
    world: Session, ctx: StageContext
) -> None:
    pdf = b"%PDF-1.4\n" + bytes(range(256)) * 12_000  # 3 MB: read back in slices
    raw = (
        HEADERS.format(id="by-reference@x.fi")
        + 'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: text/plain\r\n\r\nliitteenä luettelo\r\n"
        "--b\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n"
        'Content-Disposition: attachment; filename="luettelo.pdf"\r\n\r\n'
        + base64.encodebytes(pdf).decode().replace("\n", "\r\n")
        + "--b--\r\n"
    ).encode()
    digest = store_blob(world, ctx.settings, raw, "message/rfc822")
    message = {k: v for k, v in wrap(raw, ctx).items() if k != "raw_b64"} | {"raw_ref": digest}
    with statements_run(world) as statements:
        result = ingest_email(world, ctx, message)
    assert result.outcome == "stored"
    # The raw bytes are in the store already: only the attachment's blob is written.
    assert sum("INSERT INTO document_blob" in s for s in statements) == 1
    event = event_json(world, result.event_id, ctx)
    (raw_document,) = documents(event, "raw_message")
    assert raw_document["sha256"] == digest
    (attachment,) = documents(event, "attachment")
    assert attachment["sha256"] == hashlib.sha256(pdf).hexdigest()


def test_unknown_raw_ref_is_rejected_with_the_reason(world: Session, ctx: StageContext) -> None:
    message = {k: v for k, v in wrap(simple_email(), ctx).items() if k != "raw_b64"}
    with pytest.raises(BadInput) as caught:
        ingest_email(world, ctx, message | {"raw_ref": "0" * 64})
    assert caught.value.reason == f"raw_ref {'0' * 64} is not a stored document"
