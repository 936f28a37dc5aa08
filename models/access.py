"""Who may use the HTTP service: API tokens (hashed at rest) and their scopes."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, utcnow

#: ingest: post messages; read: read everything; admin: both, and link events by hand.
SCOPES = ("ingest", "read", "admin")


class ApiToken(Base):
    """One token, shown once when created; only its SHA-256 is kept (a token is 256 random bits,
    so a fast hash is enough: there is nothing to guess that a slow one would protect)."""

    __tablename__ = "api_token"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    scope: Mapped[str] = mapped_column(String(20))
    #: The staff member the token acts for (a seller's screen), if any.
    staff_id: Mapped[int | None] = mapped_column(ForeignKey("staff.id", ondelete="SET NULL"))
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class ServiceKey(Base):
    """A secret the HTTP service's replicas share (the key that signs browser sessions), made
    once on first use, so that any replica verifies what another signed."""

    __tablename__ = "service_key"

    name: Mapped[str] = mapped_column(String(40), primary_key=True)
    value: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
