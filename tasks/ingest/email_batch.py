"""Set-based ingest of a batch's new emails: a mailbox backfill at the speed of the database.

An email costs the email stage fifteen statements or so; here a batch's new emails cost one
statement each for the whole batch: the events, their ledger rows, the senders' windows,
properties, participants, party keys, the documents' bytes and their rows, and one tally move.
Each email is still read, parsed, matched and classified by the email stage's own functions
(``read_email``, ``compose_email``, ``email_documents``), in the batch's order, so an email
gives the same event, documents and counts whichever way it came; a reply's thread key counts
the emails before it in the batch as held.

What this stage does not take is left to the email stage, message by message, in the batch's
transaction (``tasks.batch``):

- messages that do not validate, name an erased person, are automatic (auto-replies, bounces)
  or are calendar invitations (meetings);
- emails whose Message-ID or bytes were accepted before, or came earlier in the batch;
- the emails of a sender whose window would go over the mail-loop limit (the stage rejects
  the ones over it, in order);
- inbound emails from an unknown party while the lead rule may make them leads;
- the emails after the first :data:`BATCH_BYTES` of raw email (the batch's memory stays
  bounded); they are stored after this stage's, and their threads joined as for mail that
  arrives out of order.

When an email left to the stage shares a conversation with one this stage takes, or an email
would move replies stored before to its thread, or another transaction wrote one of the
emails, or a sender's window went over the limit meanwhile, or the party of an unlinked email
changed between its match and its party keys' locks, ``BatchRaced`` rolls back this stage's
savepoint and every message goes through the email stage instead: slower, never different.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.base import utcnow
from models.db import chunked, insert_rows, table_of
from models.documents import DocumentBlob
from models.events import CrmEvent, EventParticipant, EventPropertyLink
from models.invalid import BadInput
from models.ledger import InboundMessage
from models.parties import EventPartyKey
from models.schemas.email import SCHEMA
from tasks.attach import DOCUMENT_INSERT, plan_document, store_blobs
from tasks.context import StageContext
from tasks.ingest.email import (
    EMAIL_SOURCE_SYSTEM,
    ComposedEmail,
    ReadEmail,
    compose_email,
    count_senders,
    email_documents,
    may_be_invitation,
    read_email,
    refuse_automatic,
    sender_counts,
)
from tasks.ingest.email_parse import ParsedEmail
from tasks.ingest.meeting import find_invitation
from tasks.leads import LEAD
from tasks.relink import OPEN_STATES, match_from_keys
from tasks.store import (
    EVENT_KEY,
    BatchRaced,
    BulkResult,
    StageResult,
    event_column_defaults,
    event_view,
    insert_new,
    ledger_row,
    lock_party_keys,
    party_keys,
    tally_keys,
)

#: Raw email this stage holds at once (each email's bytes, parse and documents); the emails
#: after it go through the email stage, one at a time.
BATCH_BYTES = 32 * 1024 * 1024


@dataclass
class _Email:
    """One new email of the batch: read, then composed, then stored."""

    index: int
    payload: dict[str, Any]
    read: ReadEmail
    composed: ComposedEmail | None = None
    event: CrmEvent | None = None

    @property
    def thread_ids(self) -> set[str]:
        """Every Message-ID it names or references: the conversations it may belong to."""
        found: set[str] = set()
        inner: list[ParsedEmail | None] = [self.read.parsed]
        while inner:
            email = inner.pop()
            if email is None:
                continue
            found.update(email.thread_candidates)
            if email.message_id:
                found.add(email.message_id)
            inner += [email.forwarded, *email.other_messages]
        return found


def ingest_new_emails(
    session: Session,
    ctx: StageContext,
    messages: Sequence[tuple[int, Any]],
    before_leaving: Callable[[], None] = lambda: None,
) -> BulkResult:
    """Store the new emails among ``messages`` (index, message) set-based; see the docstring.

    What the stage leaves is known before it writes: ``before_leaving`` is called then, when it
    leaves any message, so that the batch takes what its message-by-message part needs first.
    """
    result = BulkResult()
    emails = _read_all(session, ctx, messages, result)
    emails = _leave_known(session, emails, result)
    emails, limited = _leave_over_limit(session, ctx, emails, result)
    _compose_all(session, ctx, emails, limited, result)
    emails = [email for email in emails if email.composed is not None]
    if result.left:
        before_leaving()
    if not emails:
        return result
    _insert_events(session, emails)
    _insert_ledger(session, emails)
    _count_senders(session, ctx, emails)
    _insert_links(session, ctx, emails)
    _insert_documents(session, ctx, emails)
    zones: dict[int, ZoneInfo] = {}
    for email in emails:
        assert email.event is not None
        keys = tally_keys(session, email.event, zones)
        result.deltas += [(key, 1) for key in keys]
        sellers = {key.seller_id for key in keys}
        result.results[email.index] = StageResult("stored", email.event.id, "created", sellers)
    return result


def _read_all(
    session: Session,
    ctx: StageContext,
    messages: Sequence[tuple[int, Any]],
    result: BulkResult,
) -> list[_Email]:
    """Read and parse each message; what the email stage must judge is left to it."""
    emails: list[_Email] = []
    sizes = _stored_sizes(session, messages)
    held, full = 0, False
    for index, payload in messages:
        size = _size(payload, sizes)
        full = full or (size is not None and held + size > BATCH_BYTES)
        if size is None or full:
            result.left.append(index)
            continue
        try:
            read = read_email(session, ctx.settings, payload)
            if may_be_invitation(read) and find_invitation(read.raw, ctx.settings.zone):
                raise BadInput("a calendar invitation: a meeting, the email stage's")
            refuse_automatic(read)
        except BadInput:
            result.left.append(index)  # the email stage rejects it, with its reason
            continue
        held += len(read.raw)
        emails.append(_Email(index, payload, read))
    return emails


def _stored_sizes(session: Session, messages: Sequence[tuple[int, Any]]) -> dict[str, int]:
    """The size of each raw email the messages refer to (``raw_ref``), before reading any."""
    refs = {
        payload["raw_ref"]
        for _index, payload in messages
        if isinstance(payload, dict) and isinstance(payload.get("raw_ref"), str)
    }
    if not refs:
        return {}
    rows = session.execute(
        select(DocumentBlob.sha256, DocumentBlob.size).where(DocumentBlob.sha256.in_(sorted(refs)))
    ).all()
    return {digest: size for digest, size in rows}


def _size(payload: Any, sizes: dict[str, int]) -> int | None:
    """A message's raw email size as sent (base64 inline), or None when it is not a message
    this stage can size (the email stage rejects it, or reads it alone)."""
    if not isinstance(payload, dict):
        return None
    if isinstance(ref := payload.get("raw_ref"), str):
        return sizes.get(ref)
    inline = payload.get("raw_b64")
    return len(inline) * 3 // 4 if isinstance(inline, str) else None


def _leave_known(session: Session, emails: list[_Email], result: BulkResult) -> list[_Email]:
    """Emails whose Message-ID or bytes were accepted before, or earlier in the batch, are
    duplicates: the email stage says which kind."""
    ids = sorted({email.read.message_id for email in emails})
    keys = sorted({_ledger_key(email) for email in emails})
    stored: set[str] = set()
    for chunk in chunked(ids):
        stored.update(
            session.scalars(
                select(CrmEvent.source_id).where(
                    CrmEvent.source_system == EMAIL_SOURCE_SYSTEM,
                    CrmEvent.source_kind == "email",
                    CrmEvent.source_id.in_(chunk),
                )
            )
        )
    accepted: set[str] = set()
    for chunk in chunked(keys):
        accepted.update(
            session.scalars(
                select(InboundMessage.idempotency_key).where(
                    InboundMessage.idempotency_key.in_(chunk)
                )
            )
        )
    taken = []
    for email in emails:
        message_id, key = email.read.message_id, _ledger_key(email)
        if message_id in stored or key in accepted:
            result.left.append(email.index)
        else:
            taken.append(email)
        stored.add(message_id)
        accepted.add(key)
    return taken


def _leave_over_limit(
    session: Session, ctx: StageContext, emails: list[_Email], result: BulkResult
) -> tuple[list[_Email], list[_Email]]:
    """A sender whose window would go over the mail-loop limit: all its emails to the stage.
    Returns the emails kept and those left."""
    limit = ctx.settings.email_sender_limit
    if limit <= 0:
        return emails, []
    batch = Counter(email.read.sender[:320] for email in emails if email.read.sender)
    counted = sender_counts(session, ctx.settings, batch)
    over = {sender for sender, n in batch.items() if counted.get(sender, 0) + n > limit}
    if not over:
        return emails, []
    left = [email for email in emails if email.read.sender[:320] in over]
    result.left += [email.index for email in left]
    return [email for email in emails if email.read.sender[:320] not in over], left


def _compose_all(
    session: Session,
    ctx: StageContext,
    emails: list[_Email],
    left: list[_Email],
    result: BulkResult,
) -> None:
    """Match and classify each email in the batch's order, the ones before it counting as held
    for its thread; an email the lead rule may take is left to the stage (``left``: those left
    already that the stage will store)."""
    # The stored emails a new email of the batch would move to its thread (join_thread): then
    # the stage, whose writes the next emails would read.
    named = sorted({i for email in emails for i in email.thread_ids})
    stored_threads: set[str | None] = set()
    for chunk in chunked(named):
        stored_threads.update(
            session.scalars(
                select(CrmEvent.thread_key)
                .where(
                    CrmEvent.source_kind == "email",
                    CrmEvent.thread_key.in_(chunk),
                )
                .distinct()
            )
        )
    earlier: list[list[Any]] = []  # [Message-ID, thread key] of the batch's emails so far
    for email in emails:
        read = email.read
        composed = compose_email(
            session, ctx, read.parsed, read.message, read.notes(), [tuple(e) for e in earlier]
        )
        columns = composed.columns
        if _may_become_a_lead(ctx, columns):
            left.append(email)
            result.left.append(email.index)
            continue
        key = columns["thread_key"]
        moved = {i for i in composed.own_ids if i and i != key}
        if moved & stored_threads:
            raise BatchRaced(
                f"email {read.message_id} joins replies stored before to its thread", again=False
            )
        for row in earlier:  # join_thread, among the batch's emails
            if row[1] in moved:
                row[1] = key
        for other in emails:
            if other.composed is not None and other.composed.columns["thread_key"] in moved:
                other.composed.columns["thread_key"] = key
        earlier.append([read.message_id, key])
        email.composed = composed
    result.left.sort()
    # An email left to the stage is stored after this stage's: one of the same conversation
    # would then be keyed otherwise than in the batch's order.
    taken = {i for email in emails if email.composed is not None for i in email.thread_ids}
    if any(email.thread_ids & taken for email in left):
        raise BatchRaced(
            "an email left to the email stage shares a thread with the batch's", again=False
        )


def _may_become_a_lead(ctx: StageContext, columns: dict[str, Any]) -> bool:
    """An inbound email from an unknown party may be a lead (``tasks.leads``): the stage's."""
    return (
        columns["direction"] == "inbound"
        and columns["link_state"] == "unlinked"
        and (ctx.settings.lead_from_unknown_emails or columns["category_code"] == LEAD)
    )


def _ledger_key(email: _Email) -> str:
    return f"email:{email.read.digest}"


def _insert_events(session: Session, emails: list[_Email]) -> None:
    """The events, in one statement, in the batch's order, as the email stage inserts them."""
    now = utcnow()
    defaults = event_column_defaults()
    rows = []
    for email in emails:
        assert email.composed is not None
        rows.append(
            {
                **defaults,
                "source_system": EMAIL_SOURCE_SYSTEM,
                "source_kind": "email",
                "source_id": email.read.message_id,
                "created_at": now,
                "updated_at": now,
                **email.composed.columns,
            }
        )
    ids = insert_new(session, table_of(CrmEvent), rows, EVENT_KEY)
    if ids is None:
        raise BatchRaced("an email of the batch was stored meanwhile")
    for email, row, event_id in zip(emails, rows, ids, strict=True):
        email.event = event_view(row | {"id": event_id})


def _insert_ledger(session: Session, emails: list[_Email]) -> None:
    """Their ledger rows, each with its event, in one statement."""
    rows = []
    for email in emails:
        assert email.event is not None
        payload = {k: v for k, v in email.payload.items() if k != "raw_b64"}
        row = ledger_row(
            _ledger_key(email),
            SCHEMA,
            "email",
            email.read.message["source_system"],
            email.read.message_id,
            payload | {"raw_sha256": email.read.digest},
        )
        rows.append(row | {"event_id": email.event.id})
    if insert_new(session, table_of(InboundMessage), rows, ("idempotency_key",)) is None:
        raise BatchRaced("an email of the batch was accepted meanwhile")


def _count_senders(session: Session, ctx: StageContext, emails: list[_Email]) -> None:
    limit = ctx.settings.email_sender_limit
    senders = Counter(
        email.composed.sender for email in emails if email.composed and email.composed.sender
    )
    if limit <= 0 or not senders:
        return
    counts = count_senders(session, ctx.settings, senders)
    if any(count > limit for count in counts.values()):
        raise BatchRaced("a sender's window went over the limit meanwhile")


def _insert_links(session: Session, ctx: StageContext, emails: list[_Email]) -> None:
    """Properties, participants and party keys, one statement each; an unlinked email takes
    its party keys' locks and is matched again, as the email stage does."""
    properties: list[dict[str, Any]] = []
    participants: list[dict[str, Any]] = []
    keys: list[dict[str, Any]] = []
    open_keys = []
    for email in emails:
        event, composed = email.event, email.composed
        assert event is not None and composed is not None
        properties += [
            {"event_id": event.id, "property_code": code}
            for code in sorted(set(composed.properties))
        ]
        participants += [
            {"event_id": event.id, "staff_id": staff_id} for staff_id in sorted(composed.staff_ids)
        ]
        found = party_keys(session, ctx.settings, addresses=composed.customer_side)
        keys += [
            {"event_id": event.id, "kind": key.kind, "value": key.value, "position": position}
            for position, key in enumerate(found)
        ]
        if event.link_state != "linked":
            open_keys += found
    for model, rows in (
        (EventPropertyLink, properties),
        (EventParticipant, participants),
        (EventPartyKey, keys),
    ):
        insert_rows(session, table_of(model), rows)
    if not open_keys:
        return
    lock_party_keys(session, open_keys)
    for email in emails:
        event = email.event
        assert event is not None
        if event.link_state not in OPEN_STATES:
            continue
        again = match_from_keys(session, ctx.settings, event)
        if again is not None and (again.customer_id, again.contact_id, again.state) != (
            event.customer_id,
            event.contact_id,
            event.link_state,
        ):
            raise BatchRaced(f"the party of email {event.source_id} changed meanwhile")


def _insert_documents(session: Session, ctx: StageContext, emails: list[_Email]) -> None:
    """The memo, the raw email and the attachments of each: their bytes in one statement (in
    one order), then their rows in another."""
    settings = ctx.settings
    rows: list[dict[str, Any]] = []
    blobs: list[dict[str, Any]] = []
    for email in emails:
        event, composed = email.event, email.composed
        assert event is not None and composed is not None
        documents: list[dict[str, Any]] = []
        if composed.memo:
            memo: dict[str, Any] = {
                "content": composed.memo.encode("utf-8"),
                "filename": "memo.txt",
                "declared_type": "text/plain",
                "role": "memo",
            }
            documents.append(memo)
        documents += email_documents(settings, email.read)
        attached: set[tuple[str, str, str | None]] = set()
        for document in documents:
            planned = plan_document(settings, event.id, **document)
            if planned.blob is not None:
                blobs.append(planned.blob)
            name = (planned.document.role, planned.document.filename, planned.document.sha256)
            if name not in attached:
                attached.add(name)
                rows.append(planned.row)
    store_blobs(session, blobs)
    if rows:
        session.execute(DOCUMENT_INSERT, rows)
