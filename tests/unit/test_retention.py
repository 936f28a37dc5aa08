"""Retention deletes exactly what is older than its setting, and says what it deleted."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.documents import DocumentBlob, EventDocument
from models.ledger import FailedMessage, InboundMessage, RejectedMessage
from tasks.attach import attach, read_blob, remove_files
from tasks.context import StageContext
from tasks.ingest.call import ingest_call
from tasks.ledger import kept_payload
from tasks.retention import apply_retention, is_deleted_payload
from tests.messages import outbound_call

NOW = datetime(2026, 12, 6, 4, 0, tzinfo=UTC)


def days_ago(days: float) -> datetime:
    return NOW - timedelta(days=days)


def call_event(world: Session, ctx: StageContext, call_id: str) -> int:
    result = ingest_call(world, ctx, outbound_call(call_id, "2026-11-24T09:00:00+02:00"))
    assert result.event_id is not None
    return result.event_id


def document(
    world: Session, ctx: StageContext, event_id: int, role: str, content: bytes, age: float
) -> EventDocument:
    attach(
        world,
        ctx.settings,
        event_id,
        content=content,
        filename=f"{role}-{age}.bin",
        declared_type="application/octet-stream",
        role=role,
    )
    row = world.scalars(
        select(EventDocument).where(
            EventDocument.event_id == event_id, EventDocument.filename == f"{role}-{age}.bin"
        )
    ).one()
    row.created_at = days_ago(age)
    return row


def rejected(world: Session, ctx: StageContext, age: float, payload: Any) -> RejectedMessage:
    row = RejectedMessage(
        task_name="crm.ingest.call",
        task_id=f"ret-{age}",
        reason="invalid",
        errors={},
        payload=kept_payload(world, ctx.settings, payload),
        rejected_at=days_ago(age),
    )
    world.add(row)
    return row


def ledger(world: Session, kind: str, age: float) -> InboundMessage:
    row = InboundMessage(
        idempotency_key=f"{kind}:ret-{age}",
        schema=f"crm.{kind}/1",
        source_kind=kind,
        source_system="ret",
        source_id=f"ret-{age}",
        payload={"mail_from": "matti.virtanen@pohjolankone.fi"},
        received_at=days_ago(age),
    )
    world.add(row)
    return row


def blob_exists(world: Session, digest: str | None) -> bool:
    return world.get(DocumentBlob, digest) is not None


def test_retention_deletes_exactly_what_is_older_than_its_setting(
    world: Session, ctx: StageContext
) -> None:
    event_id = call_event(world, ctx, "ret-1")
    old_recording = document(world, ctx, event_id, "recording", b"old recording", 31)
    young_recording = document(world, ctx, event_id, "recording", b"young recording", 29)
    # The same bytes as an attachment of another role, kept: the bytes stay.
    shared_old = document(world, ctx, event_id, "recording", b"shared bytes", 40)
    shared_kept = document(world, ctx, event_id, "raw_message", b"shared bytes", 40)
    old_attachment = document(world, ctx, event_id, "attachment", b"old attachment", 31)
    old_rejection = rejected(world, ctx, 91, {"schema": "crm.call/1", "from": "040 123 4567"})
    young_rejection = rejected(world, ctx, 89, {"schema": "crm.call/1"})
    large = {"schema": "crm.call/1", "note": "x" * 70_000}
    old_failure = FailedMessage(
        task_name="crm.ingest.call",
        task_id="ret-failed",
        kind="bug",
        exception="KeyError",
        attempts=1,
        payload=kept_payload(world, ctx.settings, large),
        failed_at=days_ago(100),
    )
    world.add(old_failure)
    old_email, old_call, young_party = (
        ledger(world, "email", 31),
        ledger(world, "call", 31),
        ledger(world, "party", 29),
    )
    world.flush()
    by_reference = old_failure.payload["payload_sha256"]
    digests = {
        "old": old_recording.sha256,
        "young": young_recording.sha256,
        "shared": shared_old.sha256,
        "attachment": old_attachment.sha256,
    }
    settings = replace(
        ctx.settings,
        retain_recordings_days=30,
        retain_raw_emails_days=None,
        retain_attachments_days=30,
        retain_rejected_days=90,
        retain_failed_days=90,
        retain_ledger_days=30,
    )

    planned = apply_retention(world, settings, now=NOW, dry_run=True)
    assert world.get(EventDocument, old_recording.id).sha256 == digests["old"]  # type: ignore[union-attr]
    assert not is_deleted_payload(old_rejection.payload)

    report = apply_retention(world, settings, now=NOW)
    deleted = {k.kind: (k.days, k.deleted) for k in report.kinds}
    assert deleted == {
        "recordings": (30, 2),
        "raw_emails": (None, 0),
        "attachments": (30, 1),
        "rejected_payloads": (90, 1),
        "failed_payloads": (90, 1),
        "ledger_payloads": (30, 1),
    }
    assert planned.as_json()["kinds"] == report.as_json()["kinds"]
    freed = {k.kind: k.bytes_freed for k in report.kinds}
    assert freed["recordings"] == len(b"old recording")  # the shared bytes are kept
    assert freed["attachments"] == len(b"old attachment")
    assert freed["failed_payloads"] > 70_000
    assert report.summary == (
        "retention deleted: recordings 2 (13 bytes), attachments 1 (14 bytes),"
        " rejected_payloads 1, failed_payloads 1 (70033 bytes), ledger_payloads 1"
    )

    world.expire_all()
    assert old_recording.sha256 is None and "retention of recordings" in old_recording.note
    assert young_recording.sha256 == digests["young"]
    assert shared_old.sha256 is None and shared_kept.sha256 == digests["shared"]
    assert not blob_exists(world, digests["old"]) and not blob_exists(world, digests["attachment"])
    assert blob_exists(world, digests["young"]) and blob_exists(world, digests["shared"])
    assert is_deleted_payload(old_rejection.payload)
    assert old_rejection.reason == "invalid"  # the row stays, with its reason
    assert not is_deleted_payload(young_rejection.payload)
    assert is_deleted_payload(old_failure.payload) and not blob_exists(world, by_reference)
    assert is_deleted_payload(old_email.payload)
    assert not is_deleted_payload(old_call.payload)  # a late update folds with it
    assert not is_deleted_payload(young_party.payload)

    again = apply_retention(world, settings, now=NOW)
    assert all(k.deleted == 0 for k in again.kinds)


def test_off_keeps_everything_and_the_defaults_keep_documents(
    world: Session, ctx: StageContext
) -> None:
    event_id = call_event(world, ctx, "ret-2")
    old = document(world, ctx, event_id, "recording", b"kept for ever", 3000)
    world.flush()
    report = apply_retention(world, ctx.settings, now=NOW)
    assert {k.kind: k.days for k in report.kinds} == {
        "recordings": None,
        "raw_emails": None,
        "attachments": None,
        "rejected_payloads": 90,
        "failed_payloads": 90,
        "ledger_payloads": None,
    }
    world.expire_all()
    assert old.sha256 is not None


def test_files_of_the_filesystem_store_go_after_the_commit(
    world: Session, ctx: StageContext, tmp_path: Path
) -> None:
    settings = replace(
        ctx.settings,
        document_store="filesystem",
        document_dir=tmp_path,
        retain_recordings_days=30,
    )
    files = StageContext(settings, ctx.task_id)
    event_id = call_event(world, files, "ret-3")
    old = document(world, files, event_id, "recording", b"a recording on disk", 31)
    world.flush()
    digest = old.sha256
    assert digest is not None and read_blob(world, settings, digest) == b"a recording on disk"
    path = tmp_path / digest[:2] / digest
    report = apply_retention(world, settings, now=NOW)
    assert report.files == [path] and path.exists()  # until the caller has committed
    remove_files(report.files)
    assert not path.exists()
