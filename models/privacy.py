"""Erasures of personal data: what was erased, when and by whom, never whose."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, JsonValue, utcnow


class Erasure(Base):
    """One ``crm-events erase``: the kind of subject, the kinds of data, the rows and documents
    it changed per table. No name, address or number of the person is kept here."""

    __tablename__ = "erasure"

    id: Mapped[int] = mapped_column(primary_key=True)
    erased_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: Who ran it (``--by``, else the operating system's user).
    erased_by: Mapped[str] = mapped_column(String(200))
    #: contact | customer | number | address
    subject: Mapped[str] = mapped_column(String(20))
    #: The kinds of data erased: name, email, phone.
    data_kinds: Mapped[list[str]] = mapped_column(JsonValue, default=list)
    #: table (or "documents") -> rows changed or deleted.
    counts: Mapped[dict[str, Any]] = mapped_column(JsonValue, default=dict)


class ErasedIdentifier(Base):
    """A keyed hash (HMAC-SHA-256) of an identifier of an erased person: a contact (customer
    number and name), an email address or a phone number (E.164). A message that names it again
    is refused, so that a re-import or a late message cannot bring the person back silently."""

    __tablename__ = "erased_identifier"

    id: Mapped[int] = mapped_column(primary_key=True)
    erasure_id: Mapped[int] = mapped_column(ForeignKey("erasure.id", ondelete="CASCADE"))
    #: contact | email | phone
    kind: Mapped[str] = mapped_column(String(10))
    digest: Mapped[str] = mapped_column(String(64), index=True)
