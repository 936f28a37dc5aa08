"""Retention: what is older than its setting is deleted, nightly, and the run says what went.

Personal data is kept no longer than needed (GDPR article 5(1)(e)). Each kind has its number of
days (``CRM_RETAIN_*_DAYS``, ``off`` keeps it for ever):

- documents by role: call recordings (``recording``), raw emails (``raw_message``), and the
  attachments of emails and visits (``attachment``, ``photo``, ``memo``). The document stays
  listed on its event as a stub (no bytes, a note of when and why it went), as a document
  refused for its size is; the bytes go once no other document or kept message refers to them.
- the payloads of rejected and failed messages (90 days by default): the row stays, with its
  reason, time and task, but can no longer be replayed.
- the ledger's payloads of emails and parties (the envelope's addresses, master data as sent):
  the row stays, so that a message sent again is still known as a duplicate. The updates of
  calls and visits are kept as long as their event: a late update is folded with all of them.

Age is counted from when the document was attached, the message rejected or failed, or the
ledger row received. ``crm.maintenance.retention`` runs nightly (beat) and ``crm-events
retention [--dry-run]`` on demand; each reports what it deleted, per kind.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from config.settings import Settings
from models.base import utcnow
from models.documents import EventDocument
from models.ledger import FailedMessage, InboundMessage, RejectedMessage
from tasks.attach import delete_unreferenced_blobs

log = logging.getLogger(__name__)

#: kind -> (its setting, the document roles it covers); a kind without roles is a payload.
DOCUMENT_KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "recordings": ("retain_recordings_days", ("recording",)),
    "raw_emails": ("retain_raw_emails_days", ("raw_message",)),
    "attachments": ("retain_attachments_days", ("attachment", "photo", "memo")),
}
PAYLOAD_KINDS: dict[str, str] = {
    "rejected_payloads": "retain_rejected_days",
    "failed_payloads": "retain_failed_days",
    "ledger_payloads": "retain_ledger_days",
}
#: The ledger's kinds whose payloads may go (calls and visits are folded from theirs).
LEDGER_KINDS = ("email", "party")
#: What a payload deleted by retention is replaced with (``is_deleted_payload``).
DELETED = "deleted by retention"


@dataclass
class KindReport:
    kind: str
    days: int | None
    #: Rows whose payload or document went.
    deleted: int = 0
    #: Bytes no longer stored (documents, and payloads kept by reference).
    bytes_freed: int = 0


@dataclass
class RetentionReport:
    dry_run: bool
    at: datetime
    kinds: list[KindReport] = field(default_factory=list)
    #: Files of the filesystem store to remove once the transaction has committed.
    files: list[Path] = field(default_factory=list)

    @property
    def summary(self) -> str:
        done = [
            f"{k.kind} {k.deleted}" + (f" ({k.bytes_freed} bytes)" if k.bytes_freed else "")
            for k in self.kinds
            if k.days is not None
        ]
        verb = "would delete" if self.dry_run else "deleted"
        return f"retention {verb}: " + (", ".join(done) if done else "nothing is set")

    def as_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "at": self.at.isoformat(),
            "kinds": [
                {
                    "kind": k.kind,
                    "days": k.days,
                    "deleted": k.deleted,
                    "bytes_freed": k.bytes_freed,
                }
                for k in self.kinds
            ],
        }


def apply_retention(
    session: Session, settings: Settings, *, now: datetime | None = None, dry_run: bool = False
) -> RetentionReport:
    """Delete (or, with ``dry_run``, count) what is older than its setting; see the docstring.

    Runs in the caller's transaction; the files in ``report.files`` are the caller's to remove
    after the commit (``tasks.attach.remove_files``), so a rollback leaves every document whole.
    """
    now = now or utcnow()
    report = RetentionReport(dry_run, now)
    going = _Going()
    for kind, (setting, roles) in DOCUMENT_KINDS.items():
        entry = KindReport(kind, getattr(settings, setting))
        report.kinds.append(entry)
        if entry.days is not None:
            _documents(session, entry, roles, now, going)
    for kind, setting in PAYLOAD_KINDS.items():
        entry = KindReport(kind, getattr(settings, setting))
        report.kinds.append(entry)
        if entry.days is not None:
            _payloads(session, entry, now, going)
    if not dry_run:
        going.apply(now)
        session.flush()
    _free_blobs(session, settings, report, going, dry_run)
    return report


@dataclass
class _Going:
    """What this run takes: documents to make stubs, payloads to replace, and the hashes they
    held (hash -> the kind that released it)."""

    documents: list[tuple[EventDocument, KindReport]] = field(default_factory=list)
    payloads: list[tuple[Any, KindReport]] = field(default_factory=list)
    hashes: dict[str, KindReport] = field(default_factory=dict)

    def apply(self, now: datetime) -> None:
        day = now.date().isoformat()
        for document, entry in self.documents:
            document.sha256 = None
            note = f"deleted on {day} after {entry.days} days (retention of {entry.kind})"
            document.note = f"{document.note}; {note}" if document.note else note
        for row, entry in self.payloads:
            row.payload = {"payload": DELETED, "on": day, "days": entry.days}


def _documents(
    session: Session, entry: KindReport, roles: tuple[str, ...], now: datetime, going: _Going
) -> None:
    assert entry.days is not None
    documents = session.scalars(
        select(EventDocument)
        .where(
            EventDocument.role.in_(roles),
            EventDocument.sha256.is_not(None),
            EventDocument.created_at < now - timedelta(days=entry.days),
        )
        .order_by(EventDocument.id)
    ).all()
    entry.deleted = len(documents)
    for document in documents:
        going.documents.append((document, entry))
        assert document.sha256 is not None
        going.hashes.setdefault(document.sha256, entry)


def _payloads(session: Session, entry: KindReport, now: datetime, going: _Going) -> None:
    assert entry.days is not None
    cutoff = now - timedelta(days=entry.days)
    rows: list[Any]
    if entry.kind == "rejected_payloads":
        rows = _old(session, RejectedMessage, RejectedMessage.rejected_at, cutoff)
    elif entry.kind == "failed_payloads":
        rows = _old(session, FailedMessage, FailedMessage.failed_at, cutoff)
    else:
        rows = _old(
            session,
            InboundMessage,
            InboundMessage.received_at,
            cutoff,
            InboundMessage.source_kind.in_(LEDGER_KINDS),
        )
    entry.deleted = len(rows)
    for row in rows:
        going.payloads.append((row, entry))
        payload = row.payload
        if isinstance(payload, dict) and isinstance(payload.get("payload_sha256"), str):
            going.hashes.setdefault(payload["payload_sha256"], entry)


def _old(session: Session, model: Any, moment: Any, cutoff: datetime, *where: Any) -> list[Any]:
    rows = session.scalars(select(model).where(moment < cutoff, *where).order_by(model.id)).all()
    return [row for row in rows if not is_deleted_payload(row.payload)]


def is_deleted_payload(payload: Any) -> bool:
    """A payload that retention replaced (the row can no longer be replayed)."""
    return isinstance(payload, dict) and payload.get("payload") == DELETED


def _free_blobs(
    session: Session, settings: Settings, report: RetentionReport, going: _Going, dry_run: bool
) -> None:
    """Delete the bytes that no document and no kept message refers to any more."""
    freed, report.files = delete_unreferenced_blobs(
        session,
        settings,
        set(going.hashes),
        ignoring_documents={document.id for document, _entry in going.documents},
        ignoring_rows={(type(row).__name__, row.id) for row, _entry in going.payloads},
        dry_run=dry_run,
    )
    for digest, size in freed.items():
        going.hashes[digest].bytes_freed += size
