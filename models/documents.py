"""Documents: content-addressed blobs (SHA-256) and their attachment to events."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, LargeBinary, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, utcnow


class DocumentBlob(Base):
    """The bytes of a document, stored once however many events refer to them."""

    __tablename__ = "document_blob"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int]
    media_type: Mapped[str] = mapped_column(String(200))
    #: database | filesystem
    stored_in: Mapped[str] = mapped_column(String(20), default="database")
    #: The bytes when ``stored_in == "database"``; else null and the file holds them.
    content: Mapped[bytes | None] = mapped_column(LargeBinary, deferred=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class EventDocument(Base):
    """A document attached to an event under a sanitised filename and a role.

    ``sha256`` is null for a stub: a document that was refused (over the size cap) is still
    listed with its name, size and the reason, never silently dropped.
    """

    __tablename__ = "event_document"
    __table_args__ = (UniqueConstraint("event_id", "role", "filename", "sha256"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    event_id: Mapped[int] = mapped_column(
        ForeignKey("crm_event.id", ondelete="CASCADE"), index=True
    )
    sha256: Mapped[str | None] = mapped_column(ForeignKey("document_blob.sha256"), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    media_type: Mapped[str] = mapped_column(String(200))
    size: Mapped[int]
    #: attachment | memo | raw_message | photo | recording
    role: Mapped[str] = mapped_column(String(20))
    note: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
