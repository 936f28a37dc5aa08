"""Attach stage: documents stored content-addressed (SHA-256) and attached to events.

Filenames from senders are sanitised for display and never used as a path; the media type is
sniffed from the bytes; documents over the size cap become stubs with the reason.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filetype
from sqlalchemy import Text, cast, func, insert, select
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Settings
from models.db import prepared_upsert, table_of
from models.documents import DocumentBlob, EventDocument
from models.ledger import FailedMessage, RejectedMessage

log = logging.getLogger(__name__)

MAX_FILENAME = 200
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029/\\:*?\"<>|]+")
#: Joiners that real names need (emoji sequences, Persian and Indic scripts); every other
#: invisible format character goes, the bidirectional overrides first of all: U+202E shows
#: "<U+202E>gnp.exe" as "exe.png".
_KEPT_FORMAT = {"\u200c", "\u200d"}
#: Names Windows reserves for devices, whatever the extension ("CON.txt" opens the console).
_WINDOWS_DEVICES = re.compile(r"(CON|PRN|AUX|NUL|COM[0-9¹²³]|LPT[0-9¹²³])", re.IGNORECASE)


def sanitise_filename(raw: str | None, fallback: str = "document") -> str:
    """A display name that is safe anywhere: no directories, controls, invisible or
    direction-changing characters, or names a system reserves."""
    name = unicodedata.normalize("NFC", raw or "")
    name = "".join(
        c for c in name if c in _KEPT_FORMAT or unicodedata.category(c) not in ("Cf", "Cs")
    )
    # Keep only the last path component of anything path-like ("../../etc/passwd" -> "passwd").
    name = re.split(r"[/\\]", name)[-1]
    name = _UNSAFE.sub("_", name).strip(" .")
    if _WINDOWS_DEVICES.fullmatch(name.split(".")[0].rstrip(" ")):
        name = "_" + name
    if not name or set(name) <= {"_", "."}:
        name = fallback
    if len(name) > MAX_FILENAME:
        stem, dot, ext = name.rpartition(".")
        name = (
            (stem[: MAX_FILENAME - len(ext) - 1] + dot + ext)
            if dot and len(ext) < 10
            else name[:MAX_FILENAME]
        )
    return name


def sniff_media_type(content: bytes, declared: str | None) -> str:
    """The type the bytes say they are; a declared type only where the bytes cannot tell."""
    kind = filetype.guess(content[:8192])
    if kind is not None:
        return str(kind.mime)
    declared = (declared or "").strip().lower()
    if declared.startswith("text/") or declared in {"message/rfc822", "application/json"}:
        return declared
    return "application/octet-stream"


@dataclass(frozen=True)
class StoredDocument:
    sha256: str | None
    filename: str
    media_type: str
    size: int
    role: str
    note: str = ""


def store_blob(session: Session, settings: Settings, content: bytes, media_type: str) -> str:
    """Store bytes once (idempotent) and return their SHA-256."""
    # No look-up first: the upsert is one round trip whether or not the bytes are known (the
    # unique index answers a conflict before the row is built), and a file is written only
    # when it is missing.
    values = blob_row(settings, content, media_type)
    session.execute(prepared_upsert(session, DocumentBlob.__table__, _blob_insert), values)
    return str(values["sha256"])


def blob_row(settings: Settings, content: bytes, media_type: str) -> dict[str, Any]:
    """The document store's row for bytes; in the filesystem store, their file is written."""
    digest = hashlib.sha256(content).hexdigest()
    in_database = settings.document_store == "database"
    if not in_database:
        _write_file(settings, digest, content)
    return {
        "sha256": digest,
        "size": len(content),
        "media_type": media_type,
        "stored_in": settings.document_store,
        "content": content if in_database else None,
    }


def store_blobs(session: Session, rows: Iterable[dict[str, Any]]) -> None:
    """Many :func:`blob_row` rows in one statement, each once, in their SHA-256's order: two
    transactions storing the same bytes wait on one another, never each on the other."""
    unique = {row["sha256"]: row for row in rows}
    if unique:
        session.execute(
            prepared_upsert(session, DocumentBlob.__table__, _blob_insert),
            [unique[digest] for digest in sorted(unique)],
        )


DOCUMENT_INSERT = insert(table_of(EventDocument))


def _blob_insert(upsert: Any) -> Any:
    return upsert.on_conflict_do_nothing(index_elements=["sha256"])


def _write_file(settings: Settings, digest: str, content: bytes) -> None:
    folder = settings.effective_document_dir / digest[:2]
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        _fsync_folder(folder.parent)  # the new folder's own entry
    target = folder / digest
    if target.exists():
        return
    # Write, flush to disk, then rename, and flush the folder: the event's transaction commits
    # after this returns, so a crash (of the machine, too) never leaves a committed document
    # missing or half-written under its final name.
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".incoming-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(folder)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_blob(session: Session, settings: Settings, digest: str) -> bytes | None:
    blob = session.get(DocumentBlob, digest)
    if blob is None:
        return None
    if blob.stored_in == "database":
        return session.scalar(select(DocumentBlob.content).where(DocumentBlob.sha256 == digest))
    path = settings.effective_document_dir / digest[:2] / digest
    return path.read_bytes() if path.exists() else None


#: How much of a document is read at a time when it is copied out (never all in memory).
CHUNK_BYTES = 1024 * 1024


def blob_chunks(
    sessions: sessionmaker[Session], settings: Settings, digest: str, size: int
) -> Iterator[bytes]:
    """The bytes of a stored document, a chunk at a time: from its file, or from the database
    in slices (each in a short session of its own, so a slow reader holds no transaction)."""
    blob_path = settings.effective_document_dir / digest[:2] / digest
    with sessions() as session:
        stored_in = session.scalar(
            select(DocumentBlob.stored_in).where(DocumentBlob.sha256 == digest)
        )
    if stored_in == "filesystem":
        with blob_path.open("rb") as handle:
            while chunk := handle.read(CHUNK_BYTES):
                yield chunk
        return
    for offset in range(0, size, CHUNK_BYTES):
        with sessions() as session:
            part = session.scalar(
                select(func.substr(DocumentBlob.content, offset + 1, CHUNK_BYTES)).where(
                    DocumentBlob.sha256 == digest
                )
            )
        if not part:
            return
        yield bytes(part)


@dataclass(frozen=True)
class PlannedDocument:
    """A document to attach: what it is, the bytes to store (none when refused or stored
    already) and its ``event_document`` row."""

    document: StoredDocument
    blob: dict[str, Any] | None
    row: dict[str, Any]


def plan_document(
    settings: Settings,
    event_id: int,
    *,
    content: bytes | None,
    filename: str | None,
    declared_type: str | None,
    role: str,
    size: int | None = None,
    refused_reason: str = "",
    max_bytes: int | None = None,
    note: str = "",
    stored_as: str = "",
) -> PlannedDocument:
    """What :func:`attach` writes for a document, without writing it (see there)."""
    name = sanitise_filename(filename, fallback=role)
    cap = settings.max_attachment_bytes if max_bytes is None else max_bytes
    if content is not None and len(content) > cap:
        refused_reason = f"{len(content)} bytes is over the {cap}-byte attachment cap"
    blob = None
    if content is None or refused_reason:
        digest = None
        media_type = (declared_type or "application/octet-stream").lower()
        size = size if size is not None else (len(content) if content is not None else 0)
        refused = f"not stored: {refused_reason}" if refused_reason else "not stored"
        note = f"{note}; {refused}" if note else refused
    else:
        media_type = sniff_media_type(content, declared_type)
        if stored_as:
            digest = stored_as
        else:
            blob = blob_row(settings, content, media_type)
            digest = blob["sha256"]
        size = len(content)
    if filename and name != filename:
        note = (note + "; " if note else "") + f"filename sanitised from {filename[:300]!r}"
    row = {
        "event_id": event_id,
        "sha256": digest,
        "filename": name,
        "media_type": media_type,
        "size": size,
        "role": role,
        "note": note,
    }
    return PlannedDocument(StoredDocument(digest, name, media_type, size, role, note), blob, row)


def attach(
    session: Session,
    settings: Settings,
    event_id: int,
    *,
    content: bytes | None,
    filename: str | None,
    declared_type: str | None,
    role: str,
    size: int | None = None,
    refused_reason: str = "",
    max_bytes: int | None = None,
    note: str = "",
    attached: set[tuple[str, str, str | None]] | None = None,
    stored_as: str = "",
) -> StoredDocument:
    """Attach a document (or a stub when it was refused) to an event, once.

    ``max_bytes`` overrides the attachment cap (the raw email is bounded by its own limit);
    ``note`` says what the caller did to the content (kept with the document). ``attached``:
    for an event created by the calling stage, the documents it attached so far (role,
    filename, SHA-256), kept by the caller instead of asking the database each time.
    ``stored_as``: the content is already in the document store under this SHA-256 (a raw email
    the gateway stored), so it is attached without being sent to the store again.
    """
    planned = plan_document(
        settings,
        event_id,
        content=content,
        filename=filename,
        declared_type=declared_type,
        role=role,
        size=size,
        refused_reason=refused_reason,
        max_bytes=max_bytes,
        note=note,
        stored_as=stored_as,
    )
    if planned.blob is not None:
        session.execute(
            prepared_upsert(session, DocumentBlob.__table__, _blob_insert), planned.blob
        )
    document = planned.document
    if attached is not None:
        existing = (role, document.filename, document.sha256) in attached
        attached.add((role, document.filename, document.sha256))
    else:
        existing = (
            session.scalar(
                select(EventDocument.id).where(
                    EventDocument.event_id == event_id,
                    EventDocument.role == role,
                    EventDocument.filename == document.filename,
                    EventDocument.sha256.is_(None)
                    if document.sha256 is None
                    else EventDocument.sha256 == document.sha256,
                )
            )
            is not None
        )
    if not existing:
        session.execute(DOCUMENT_INSERT, planned.row)
    return document


def delete_unreferenced_blobs(
    session: Session,
    settings: Settings,
    digests: set[str],
    *,
    ignoring_documents: set[int] = frozenset(),  # type: ignore[assignment]
    ignoring_rows: set[tuple[str, int]] = frozenset(),  # type: ignore[assignment]
    dry_run: bool = False,
) -> tuple[dict[str, int], list[Path]]:
    """Delete the stored bytes that no document and no kept rejected or failed message refers
    to (a payload kept by reference names its SHA-256); documents and (model name, id) rows in
    ``ignoring_*`` are about to let go of theirs. Returns the size freed per hash, and the files
    of the filesystem store to remove once the caller has committed (:func:`remove_files`)."""
    freed: dict[str, int] = {}
    files: list[Path] = []
    for digest in sorted(digests):
        if _blob_in_use(session, digest, ignoring_documents, ignoring_rows):
            continue
        blob = session.get(DocumentBlob, digest)
        if blob is None:
            continue
        freed[digest] = blob.size
        if dry_run:
            continue
        if blob.stored_in == "filesystem":
            files.append(settings.effective_document_dir / digest[:2] / digest)
        session.delete(blob)
    session.flush()
    return freed, files


def _blob_in_use(
    session: Session, digest: str, documents: set[int], rows: set[tuple[str, int]]
) -> bool:
    holders = session.scalars(select(EventDocument.id).where(EventDocument.sha256 == digest))
    if set(holders) - documents:
        return True
    for model in (RejectedMessage, FailedMessage):
        named = session.scalars(
            select(model.id).where(cast(model.payload, Text).contains(digest))
        ).all()
        if {(model.__name__, row_id) for row_id in named} - rows:
            return True
    return False


def remove_files(paths: list[Path]) -> None:
    """Remove the filesystem store's files of deleted blobs (after the commit)."""
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("%s could not be removed: %s", path, exc)
