"""Raw email bytes under fuzzing: MIME messages of random structure, damaged ones and noise,
through the parser alone and through the email ingest task on PostgreSQL with documents
stored as files."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from hypothesis import example, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from models.documents import EventDocument
from tasks.ingest.email_parse import ParsedEmail, ParseLimits, parse_email
from tests.fuzz.conftest import IngestRunner
from tests.fuzz.emails import raw_emails
from tests.fuzz.profiles import examples
from tests.fuzz.strategies import b64

HELSINKI = ZoneInfo("Europe/Helsinki")
SURROGATE = re.compile("[\ud800-\udfff]")
TEXT_FIELDS = ("message_id", "subject", "in_reply_to", "text", "forward_memo", "auto_reply")


def storable_strings(parsed: ParsedEmail) -> list[str]:
    """Every string of a parse result that goes to the database as text."""
    found: list[str] = [str(getattr(parsed, name) or "") for name in TEXT_FIELDS]
    for name, address in [*([parsed.from_] if parsed.from_ else []), *parsed.to, *parsed.cc]:
        found += [name, address]
    found += parsed.references + parsed.notes
    found += [item.content_type for item in parsed.attachments]
    for inner in [parsed.forwarded, *parsed.other_messages]:
        if inner is not None:
            found += storable_strings(inner)
    return found


limits = st.sampled_from(
    [ParseLimits(), ParseLimits(max_parts=3, max_depth=1), ParseLimits(slice_threshold=64)]
)


#: Inputs fuzzing found once; kept as explicit examples.
FOUND = [
    b"Subject: x\r\n\r\nFrom: a@b.fi\r\nDate: Fri, 20 Nov 2026 08:41:03 +9999\r\n",
    b"Date: Fri, 31 Dec 9999 23:59:59 -1200\r\nContent-Type: text/plain\r\n\r\nx",
    b"Date: Mon, 1 Jan 0001 00:00:00 +1400\r\n\r\nx",
    b"Subject: Fwd\r\n\r\n-----Original Message-----\r\nFrom: a@b.fi\r\n"
    b"Sent: 31.12.9999 23.59 -1200\r\nSubject: y\r\n\r\nz",
    b"To: " + b"x" * 80 + b"\x15" + b"x" * 70_000 + b"\r\n\r\nbody",
    b'Content-Type: text/plain; charset="idna"\r\n\r\n\xc2\x80',
    b'Content-Type: text/plain; charset="punycode"\r\n\r\n\xc2\x80',
]


@settings(max_examples=examples(150))
@given(raw=raw_emails(), limits=limits)
@example(raw=FOUND[0], limits=ParseLimits())
@example(raw=FOUND[1], limits=ParseLimits())
@example(raw=FOUND[4], limits=ParseLimits())
@example(raw=FOUND[5], limits=ParseLimits())
@example(raw=FOUND[6], limits=ParseLimits())
def test_parser_reads_any_bytes(raw: bytes, limits: ParseLimits) -> None:
    parsed = parse_email(raw, HELSINKI, limits)
    for text in storable_strings(parsed):
        assert isinstance(text, str)
        assert "\x00" not in text, f"NUL in {text[:80]!r}"
        assert not SURROGATE.search(text), f"lone surrogate in {text[:80]!r}"
    for item in parsed.attachments:
        assert isinstance(item.content, bytes)
        assert item.filename is None or not SURROGATE.search(item.filename)


def unique_message_id(raw: bytes) -> bytes:
    """The message under a Message-ID of its own, so that it is a new event, not a duplicate
    of an earlier example (the parser reads the first Message-ID header)."""
    return f"Message-ID: <{uuid.uuid4()}@fuzz.example>\r\n".encode() + raw


@settings(max_examples=examples(100))
@given(
    raw=raw_emails(),
    fresh=st.sampled_from([True, True, True, False]),
    mail_from=st.sampled_from(["matti.virtanen@pohjolankone.fi", "x@gmail.com", "", None]),
    rcpt_to=st.lists(st.sampled_from(["crm@myyntitalo.fi", "crm+visit@myyntitalo.fi"])),
)
@example(raw=FOUND[1], fresh=True, mail_from=None, rcpt_to=[])
@example(raw=FOUND[2], fresh=True, mail_from=None, rcpt_to=[])
@example(raw=FOUND[3], fresh=True, mail_from=None, rcpt_to=[])
def test_email_ingest_of_any_bytes(
    runner: IngestRunner, raw: bytes, fresh: bool, mail_from: str | None, rcpt_to: list[str]
) -> None:
    if fresh:
        raw = unique_message_id(raw)
    message: dict[str, Any] = {
        "schema": "crm.email/1",
        "source_system": "fuzz",
        "raw_b64": b64(raw),
        "rcpt_to": rcpt_to,
    }
    if mail_from is not None:
        message["mail_from"] = mail_from
    result = runner.check("email", message)
    if result.event_id is None:
        return
    with runner.sessions() as session:
        names = session.scalars(
            select(EventDocument.filename).where(EventDocument.event_id == result.event_id)
        ).all()
    for name in names:
        assert name and "/" not in name and "\x00" not in name, repr(name)
        assert not name.startswith(".."), repr(name)


def test_documents_are_written_only_to_the_document_directory(
    runner: IngestRunner, fuzz_root: Path
) -> None:
    """After the fuzzing above (and whatever ran before): every file the ingest wrote is a
    document under its digest in the document directory, or a message of the embedded broker."""
    documents = runner.settings.effective_document_dir
    broker = runner.settings.broker_folder
    stored = 0
    for path in runner.settings.data_dir.resolve().rglob("*"):
        if not path.is_file():
            continue
        if path.is_relative_to(broker):
            continue
        assert path.is_relative_to(documents), f"a file outside the document directory: {path}"
        relative = path.relative_to(documents).parts
        assert len(relative) == 2 and re.fullmatch(r"[0-9a-f]{64}", relative[1]), path
        assert relative[0] == relative[1][:2], path
        stored += 1
    assert stored, "no document was written: the email fuzzing stored nothing"
