"""Ingest of ``crm.email/1``: a forwarded memo, a BCC'd email or a customer's mail as an event.

Who is who: a staff member forwarding a customer's email is the seller and the original sender
is the customer side (the original's date is the event time, the forwarder's text the memo); a
staff sender (BCC, the CRM address only in the envelope) is the seller and the recipients are
the customer side; otherwise the sender is the customer side. Auto-replies, delivery reports,
bounces and senders over the mail-loop limit are rejected with the reason, never stored.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import nh3
from sqlalchemy import delete, func, or_, select, update
from sqlalchemy import event as sqlalchemy_event
from sqlalchemy.orm import Session

from config.settings import Settings
from models.base import utcnow
from models.db import prepared_upsert
from models.documents import DocumentBlob
from models.events import ERP_REFERENCES, CrmEvent
from models.invalid import BadInput
from models.mail import EmailSenderWindow
from models.parties import Staff
from models.schemas.common import load_message, shared_schema
from models.schemas.email import SCHEMA, EmailMessageSchema
from tasks.attach import attach, read_blob
from tasks.classify import ClassificationRequest, classify
from tasks.context import StageContext
from tasks.erasure import refuse_erased
from tasks.ingest.email_parse import (
    Attachment,
    ParsedEmail,
    ParseLimits,
    decode_text,
    parse_email,
    raw_hash,
)
from tasks.ingest.meeting import find_invitation, ingest_meeting, might_hold_invitation
from tasks.leads import apply_lead_rule
from tasks.match import (
    customer_by_number,
    find_staff,
    find_staff_by_addresses,
    match_addresses,
)
from tasks.periods import aware
from tasks.references import EMAIL_KEY_SYSTEM
from tasks.relink import recheck_open_event
from tasks.store import (
    StageResult,
    add_participants,
    lock_event,
    move_tallies,
    record_inbound,
    record_party_keys,
    responsible_seller_id,
    set_properties,
    tally_keys,
)

#: "Asiakas: 10001", "Asiakasnumero 10001", "Customer #10001", "Customer no. 10001".
CUSTOMER_NUMBER = re.compile(
    r"\b(?:asiakas(?:numero|nro)?|customer(?:\s+(?:no\.?|number))?)\s*[:#]?\s*(\d{3,12})\b",
    re.IGNORECASE,
)

#: Emails are one event per Message-ID whichever gateway or mailbox delivered them.
EMAIL_SOURCE_SYSTEM = EMAIL_KEY_SYSTEM

#: Attachments that a browser would render as a page: stored sanitised, never as sent.
HTML_TYPES = {"text/html", "application/xhtml+xml"}


def crm_tag(address: str, settings: Settings) -> str | None:
    """``crm+visit@x`` -> ``visit`` when ``crm@x`` is a CRM address; ``""`` for ``crm@x``."""
    local, _, domain = address.strip().lower().partition("@")
    base, plus, tag = local.partition("+")
    if f"{base}@{domain}" not in settings.crm_addresses:
        return None
    return tag if plus else ""


def parse_limits(settings: Settings) -> ParseLimits:
    return ParseLimits(max_parts=settings.email_max_parts, max_depth=settings.email_max_depth)


def addresses_of(parsed: ParsedEmail) -> list[str]:
    """Every address of an email's headers, a forwarded original's included."""
    found: list[str] = []
    for email in (parsed, parsed.forwarded, *parsed.other_messages):
        if email is None:
            continue
        pairs = [*email.to, *email.cc, *([email.from_] if email.from_ else [])]
        found += [address for _name, address in pairs if address]
    return found


@dataclass
class ReadEmail:
    """An email's message as loaded, its raw bytes, their SHA-256 and what they parse to."""

    message: dict[str, Any]
    raw: bytes
    digest: str
    parsed: ParsedEmail

    @property
    def message_id(self) -> str:
        """The event's key: the Message-ID, else the SHA-256 of the raw bytes."""
        return self.parsed.message_id or f"sha256:{self.digest}"

    @property
    def sender(self) -> str:
        """The address the email is from (counted against the sender's window)."""
        parsed, message = self.parsed, self.message
        return parsed.from_[1] if parsed.from_ else (message.get("mail_from") or "").lower()

    def notes(self) -> list[str]:
        notes = list(self.parsed.notes)
        if not self.parsed.message_id:
            notes.append("no Message-ID: identified by the SHA-256 of the raw bytes")
        return notes


def read_email(session: Session, settings: Settings, payload: Any) -> ReadEmail:
    """Load, read and parse an email message; refused when it names an erased person."""
    message = load_message(shared_schema(EmailMessageSchema), payload, SCHEMA)
    raw = _raw_bytes(session, settings, message)
    digest = raw_hash(raw)
    parsed = parse_email(raw, settings.zone, parse_limits(settings))
    # An email from or to an erased person is refused; its bytes are not kept with the refusal.
    refuse_erased(
        session,
        settings,
        payload,
        emails=[message.get("mail_from"), *(message.get("rcpt_to") or []), *addresses_of(parsed)],
        withheld={"raw_b64": "<not kept: the email names an erased person>"},
    )
    message["received_at"] = aware(
        message.get("received_at"), settings.zone, parsed.notes, "received_at"
    )
    return ReadEmail(message, raw, digest, parsed)


def may_be_invitation(email: ReadEmail) -> bool:
    """Whether the email may be a calendar invitation (a meeting, ``tasks.ingest.meeting``)."""
    return not email.parsed.structure_refused and might_hold_invitation(email.raw)


def refuse_automatic(email: ReadEmail) -> None:
    """Auto-replies, delivery reports and bounces are no memo: refused with the reason."""
    if email.parsed.auto_reply:
        raise BadInput(email.parsed.auto_reply, {"headers": [email.parsed.auto_reply]})
    if email.message.get("mail_from") == "":
        # RFC 5321 §4.5.5 and RFC 3834: bounces and automatic notices use the null sender.
        reason = "null envelope sender (<>): a bounce or an automatic notice, not a memo"
        raise BadInput(reason, {"mail_from": [reason]})


def ingest_email(session: Session, ctx: StageContext, payload: Any) -> StageResult:
    settings = ctx.settings
    email = read_email(session, settings, payload)
    message, raw, digest, parsed = email.message, email.raw, email.digest, email.parsed
    if may_be_invitation(email):
        # A calendar invitation (a negotiation booked by a seller) is a meeting, not a memo;
        # calendar systems mark theirs Auto-Submitted, which is no auto-reply here.
        invitation = find_invitation(raw, settings.zone)
        if invitation is not None:
            return ingest_meeting(session, ctx, message, payload, parsed, invitation, raw, digest)
    refuse_automatic(email)
    message_id = email.message_id

    # Matched and classified before the event row exists, so that a new event is inserted
    # whole, with no UPDATE after it; a duplicate (rare) has then only spent a few reads.
    composed = compose_email(session, ctx, parsed, message, email.notes())
    event, created = lock_event(
        session,
        source_system=EMAIL_SOURCE_SYSTEM,
        source_kind="email",
        source_id=message_id,
        defaults=composed.columns,
    )
    inbound = record_inbound(
        session,
        idempotency_key=f"email:{digest}",
        schema=SCHEMA,
        source_kind="email",
        source_system=message["source_system"],
        source_id=message_id,
        payload={k: v for k, v in payload.items() if k != "raw_b64"} | {"raw_sha256": digest},
        event_id=event.id,
    )
    if not created:
        if inbound is None:
            return StageResult("duplicate", event.id, "these exact bytes were already accepted")
        # The same email through a second mailbox or gateway: one event, nothing counted twice.
        return StageResult("duplicate", event.id, "an event for this Message-ID exists")

    check_sender_limit(session, settings, composed.sender)
    # The event is new: what it has is what we attach now.
    attached: set[tuple[str, str, str | None]] = set()
    finish_email(session, ctx, event, composed, attached)
    for document in email_documents(settings, email):
        attach(session, settings, event.id, **document, attached=attached)
    return StageResult(
        "stored",
        event.id,
        "created",
        sellers_to_refresh=move_tallies(session, (), tally_keys(session, event)),
    )


def email_documents(settings: Settings, email: ReadEmail) -> list[dict[str, Any]]:
    """What a new email's event has attached besides its memo, as ``attach``'s arguments: the
    raw email, then every attachment (HTML sanitised)."""
    # Mail the gateway stored first (raw_ref) is not sent to the document store again.
    stored_as = email.digest if email.message.get("raw_ref") == email.digest else ""
    raw = {
        "content": email.raw,
        "filename": "message.eml",
        "declared_type": "message/rfc822",
        "role": "raw_message",
        # Already within max_email_bytes: the source of truth is kept whatever the attachment cap.
        "max_bytes": max(settings.max_email_bytes, settings.max_attachment_bytes),
        "stored_as": stored_as,
    }
    return [raw, *(email_file(settings, item) for item in _all_attachments(email.parsed))]


def _raw_bytes(session: Session, settings: Settings, message: dict[str, Any]) -> bytes:
    """The raw email: inline, or the document our SMTP gateway stored (checked before read)."""
    if not message.get("raw_ref"):
        raw: bytes = message["raw_b64"]
        size = len(raw)
    else:
        stored_size = session.scalar(
            select(DocumentBlob.size).where(DocumentBlob.sha256 == message["raw_ref"])
        )
        if stored_size is None:
            raise BadInput(f"raw_ref {message['raw_ref']} is not a stored document")
        size = stored_size
    if size > settings.max_email_bytes:
        raise BadInput(f"email of {size} bytes is over the {settings.max_email_bytes}-byte limit")
    if message.get("raw_ref"):
        stored = _read_stored(session, settings, message["raw_ref"], size)
        if stored is None:
            raise BadInput(f"raw_ref {message['raw_ref']} is not a stored document")
        raw = stored
    return raw


#: A raw email kept in the database is read in slices of this size: one query for the whole
#: value would hold it several times over (the driver's text form is twice the bytes).
READ_CHUNK = 1024 * 1024


def _read_stored(session: Session, settings: Settings, digest: str, size: int) -> bytes | None:
    blob = session.get(DocumentBlob, digest)
    if blob is None or blob.stored_in != "database" or size <= READ_CHUNK:
        return read_blob(session, settings, digest)
    chunks = []
    for offset in range(0, size, READ_CHUNK):
        chunk = session.scalar(
            select(func.substr(DocumentBlob.content, offset + 1, READ_CHUNK)).where(
                DocumentBlob.sha256 == digest
            )
        )
        if chunk is None:
            return None
        chunks.append(bytes(chunk))
    return b"".join(chunks)


#: Per process: the window whose expired predecessors were last cleared, by window length.
_windows_cleared: dict[int, datetime] = {}


def check_sender_limit(session: Session, settings: Settings, sender: str) -> None:
    """Count the email against its sender's window; over the limit it is a mail loop.

    The count lives in the database (an upsert that row-locks the sender's window), so the
    limit holds across worker processes. A rejected email rolls its increment back with the
    rest of the transaction: the window counts accepted emails only.
    """
    limit = settings.email_sender_limit
    if limit <= 0 or not sender:
        return
    if count_senders(session, settings, {sender: 1})[sender[:320]] > limit:
        reason = (
            f"mail loop suspected: {sender} sent more than {limit} emails to the CRM address"
            f" within {settings.email_sender_window_s} s"
        )
        raise BadInput(reason, {"from": [reason]})


def sender_counts(session: Session, settings: Settings, senders: Iterable[str]) -> dict[str, int]:
    """The emails counted so far in the current window of each sender (who has any)."""
    window = EmailSenderWindow
    found = session.execute(
        select(window.sender, window.count).where(
            window.window_start == _window_start(settings),
            window.sender.in_(sorted({s[:320] for s in senders})),
        )
    ).all()
    return {sender: count for sender, count in found}


def count_senders(session: Session, settings: Settings, added: dict[str, int]) -> dict[str, int]:
    """Add emails to their senders' windows (sender -> emails); each sender's count now.

    One upsert, the senders in one order: two transactions counting the same senders wait on
    one another, never each on the other.
    """
    window = settings.email_sender_window_s
    start = _window_start(settings)
    statement = prepared_upsert(session, EmailSenderWindow.__table__, _window_upsert)
    rows = [
        {"sender": sender, "window_start": start, "count": count}
        for sender, count in sorted({s[:320]: n for s, n in added.items()}.items())
    ]
    counts = {sender: count for sender, count in session.execute(statement, rows).all()}
    if _windows_cleared.get(window) != start:
        # The first email of a window in this process clears the windows that can never count
        # again (once per process and window, not per email). It counts as done once committed:
        # an email whose transaction rolls back leaves the clean-up to the next one.
        session.execute(
            delete(EmailSenderWindow).where(
                EmailSenderWindow.window_start < start - timedelta(seconds=window)
            )
        )
        sqlalchemy_event.listen(
            session, "after_commit", partial(_cleared, window, start), once=True
        )
    return counts


def _window_start(settings: Settings) -> datetime:
    window = settings.email_sender_window_s
    return datetime.fromtimestamp(int(utcnow().timestamp()) // window * window, UTC)


def _cleared(window: int, start: datetime, _session: Session) -> None:
    _windows_cleared[window] = start


def _window_upsert(upsert: Any) -> Any:
    table = upsert.table
    return upsert.on_conflict_do_update(
        index_elements=["sender", "window_start"],
        set_={"count": table.c.count + upsert.excluded.count},
    ).returning(table.c.sender, table.c.count)


def _all_attachments(parsed: ParsedEmail) -> Iterable[Attachment]:
    yield from parsed.attachments
    for inner in [parsed.forwarded, *parsed.other_messages]:
        if inner is not None:
            yield from _all_attachments(inner)


def email_file(settings: Settings, item: Attachment) -> dict[str, Any]:
    """An email's attachment as ``attach``'s arguments."""
    content, note = item.content, ""
    if item.content_type in HTML_TYPES and len(content) <= settings.max_attachment_bytes:
        # A browser would run the sender's scripts and fetch tracking pixels: keep the page
        # readable, drop the active parts. The original stays in the raw message.
        content = nh3.clean(decode_text(content, None, [])).encode("utf-8")
        note = "HTML sanitised (scripts, styles and event handlers removed)"
    return {
        "content": content,
        "filename": item.filename,
        "declared_type": item.content_type,
        "role": "attachment",
        "note": note,
    }


def thread_key(
    session: Session,
    candidates: list[str],
    own_ids: list[str],
    earlier: Sequence[tuple[str, str | None]] = (),
) -> str | None:
    """The conversation's key: that of the earliest referenced email we hold, else the
    earliest reference, else the email's own Message-ID (RFC 5322 §3.6.4).

    ``earlier``: (Message-ID, thread key) of emails not written yet that count as held (the
    emails before this one in a batch, ``tasks.ingest.email_batch``).
    """
    key = None
    if candidates:
        rows: list[Any] = list(
            session.execute(
                select(CrmEvent.source_id, CrmEvent.thread_key).where(
                    CrmEvent.source_kind == "email",
                    or_(CrmEvent.source_id.in_(candidates), CrmEvent.thread_key.in_(candidates)),
                )
            ).all()
        )
        wanted = set(candidates)
        rows += [row for row in earlier if row[0] in wanted or row[1] in wanted]
        known: dict[str, str] = {}
        for source_id, key_of_row in rows:
            if key_of_row:
                known.setdefault(source_id, key_of_row)
                known.setdefault(key_of_row, key_of_row)
        key = next((known[c] for c in candidates if c in known), candidates[0])
    return key or next(iter(own_ids), None)


def join_thread(session: Session, key: str | None, own_ids: list[str]) -> None:
    """Replies that arrived before the email they answer were keyed by its Message-ID; they
    are moved to the conversation's key, so the thread is one however the mail arrived."""
    moved = [i for i in own_ids if i and i != key]
    if key and moved:
        session.execute(
            update(CrmEvent)
            .where(CrmEvent.source_kind == "email", CrmEvent.thread_key.in_(moved))
            .values(thread_key=key)
        )


@dataclass
class ComposedEmail:
    """A new email's event as matched and classified, before anything is written."""

    columns: dict[str, Any]
    sender: str
    staff_ids: set[int]
    customer_side: list[str]
    properties: list[str]
    memo: str
    own_ids: list[str]
    #: The staff looked up, by address: held so that they stay in the session's identity map
    #: (it keeps objects weakly) until the tallies are keyed by the seller's time zone.
    staff_by_address: dict[str, Staff | None]


def _addresses(parsed: ParsedEmail) -> Iterable[str]:
    """Every address of an email and of the emails it forwards."""
    inner: ParsedEmail | None = parsed
    while inner is not None:
        if inner.from_:
            yield inner.from_[1]
        yield from (a for _, a in inner.to + inner.cc)
        inner = inner.forwarded


def compose_email(
    session: Session,
    ctx: StageContext,
    parsed: ParsedEmail,
    message: dict[str, Any],
    notes: list[str],
    earlier: Sequence[tuple[str, str | None]] = (),
) -> ComposedEmail:
    """Match and classify an email: the columns of its event and what to write after it.

    Reads only: nothing here writes, so an email that turns out to be a duplicate changes
    nothing. ``earlier``: see :func:`thread_key`.
    """
    settings = ctx.settings
    sender = parsed.from_[1] if parsed.from_ else (message.get("mail_from") or "").lower()
    recipients = [a for _, a in parsed.to + parsed.cc]
    envelope = [a.lower() for a in message.get("rcpt_to", [])]
    # Every address of the email and its forwards, looked up in one query.
    staff_by_address = find_staff_by_addresses(session, [sender, *_addresses(parsed)])

    def staff_of(address: str) -> Staff | None:
        if address not in staff_by_address:
            staff_by_address[address] = find_staff(session, address, settings)
        return staff_by_address[address]

    tags = [t for a in recipients + envelope if (t := crm_tag(a, settings))]
    rule_category = dict(settings.plus_address_categories).get(tags[0]) if tags else None

    sender_staff = staff_of(sender) if sender else None
    original = parsed.forwarded
    staff_ids = {sender_staff.id} if sender_staff else set()
    if original is not None and sender_staff is not None:
        # A forward of a colleague's forward: the customer is at the end of the chain.
        while original.forwarded is not None and original.from_:
            colleague = staff_of(original.from_[1])
            if colleague is None:
                break
            staff_ids.add(colleague.id)
            original = original.forwarded
        outside = [original.from_[1]] if original.from_ else []
        outside += [a for _, a in original.to + original.cc]
        occurred = original.date or parsed.date
        subject = original.subject or parsed.subject
        memo = parsed.forward_memo
        body = "\n\n".join(p for p in (memo, original.text) if p)
        candidates = original.thread_candidates + parsed.thread_candidates
        own_ids = [i for i in (original.message_id, parsed.message_id) if i]
        how = f"forwarded by {sender_staff.username}"
    else:
        outside = recipients if sender_staff is not None else [sender]
        outside += [] if sender_staff is not None else recipients
        occurred = parsed.date
        subject = parsed.subject
        memo = ""
        body = parsed.text
        candidates = parsed.thread_candidates
        own_ids = [parsed.message_id] if parsed.message_id else []
        how = "sent by staff" if sender_staff is not None else "sent by the customer side"
        if original is not None and not parsed.forwarded_inline:
            body = "\n\n".join(p for p in (body, _quoted(original)) if p)
    for other in parsed.other_messages:
        body = "\n\n".join(p for p in (body, _quoted(other)) if p)

    customer_side = []
    for address in outside:
        if crm_tag(address, settings) is not None:
            continue
        staff = staff_of(address)
        if staff is not None:
            staff_ids.add(staff.id)
        elif address not in customer_side:
            customer_side.append(address)
    match = match_addresses(session, customer_side, settings)
    if match.customer_id is None:
        # A staff memo to the CRM address names the customer in its text ("Asiakas: 10001").
        for number in CUSTOMER_NUMBER.findall(f"{subject}\n{memo or body}"[:100_000]):
            customer = customer_by_number(session, number)
            if customer is not None:
                match.customer_id, match.state = customer.id, "linked"
                match.notes.append(f"customer number {number} named in the text")
                break

    seller_id = sender_staff.id if sender_staff else None
    if seller_id is None:
        others = [s for s in staff_ids if s is not None]
        seller_id = min(others) if others else None
    if seller_id is None and match.customer_id is not None:
        seller_id = responsible_seller_id(session, match.customer_id)
        match.notes.append("no staff member involved: assigned to the customer's seller")

    classification = classify(
        session,
        ClassificationRequest(
            source_kind="email",
            rule_category=rule_category,
            rule_reason=f"recipient plus-address +{tags[0]}" if tags else "",
        ),
    )
    if occurred is None:
        occurred = message.get("received_at") or utcnow()
        notes.append("no readable date: the time received is used")
    columns = {
        "occurred_at": occurred,
        "subject": subject[:2000],
        "body": body,
        "direction": "outbound" if sender_staff is not None and original is None else "inbound",
        # A memo that arrived is done (valmis), as the seed's CRM events default to, unless its
        # envelope says open; a mail has no status of its own beside that.
        "status": message.get("state") or "done",
        "state": message.get("state") or "done",
        **{name: message.get(name) for name in ERP_REFERENCES},
        "thread_key": thread_key(session, candidates, own_ids, earlier),
        "category_code": classification.category,
        "class_code": classification.class_code,
        "type_code": classification.type_code,
        "classification_note": classification.note,
        "customer_id": match.customer_id,
        "contact_id": match.contact_id,
        "link_state": match.state,
        "candidates": match.candidates,
        "seller_id": seller_id,
        "match_note": "; ".join([how, *match.notes, *notes]),
        "details": {
            "gateway": message["source_system"],
            "from": sender,
            "to": recipients,
            "rcpt_to": envelope,
            "contact_ids": [c for c in [match.contact_id, *match.other_contact_ids] if c],
            "message_id": parsed.message_id,
            "original_message_id": original.message_id if original else None,
            "parse_notes": parsed.notes,
        },
    }
    return ComposedEmail(
        columns=columns,
        sender=sender,
        staff_ids={s for s in [*staff_ids, seller_id] if s is not None},
        customer_side=customer_side,
        properties=classification.properties,
        memo=memo,
        own_ids=own_ids,
        staff_by_address=staff_by_address,
    )


def finish_email(
    session: Session,
    ctx: StageContext,
    event: CrmEvent,
    composed: ComposedEmail,
    attached: set[tuple[str, str, str | None]],
) -> None:
    """What a new email's event has besides its row: thread, properties, participants, party
    keys, lead and memo."""
    settings = ctx.settings
    join_thread(session, event.thread_key, composed.own_ids)
    set_properties(session, event, composed.properties, new=True)
    add_participants(session, event, composed.staff_ids, new=True)
    # Master data (docs/master-data.md): remembered for the automatic re-link when a contact or
    # customer later gains one of these addresses or domains; then the unknown-party lead rule.
    record_party_keys(session, settings, event, addresses=composed.customer_side, new=True)
    recheck_open_event(session, ctx, event)
    apply_lead_rule(session, ctx, event, new=True)
    if composed.memo:
        attach(
            session,
            settings,
            event.id,
            content=composed.memo.encode("utf-8"),
            filename="memo.txt",
            declared_type="text/plain",
            role="memo",
            attached=attached,
        )


def _quoted(inner: ParsedEmail) -> str:
    """An attached email as text under a one-line heading (who, when, what)."""
    who = inner.from_[1] if inner.from_ else "unknown sender"
    when = inner.date.isoformat() if inner.date else "no date"
    heading = f"---------- {who} · {when} · {inner.subject or '(no subject)'}"
    return "\n".join(p for p in (heading, inner.text) if p)
