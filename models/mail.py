"""Email ingress state: how many emails each sender sent to the CRM address per time window.

Kept in the database so that the loop limit holds across every worker process and host.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base


class EmailSenderWindow(Base):
    """Emails accepted from one sender in one fixed window (``CRM_EMAIL_SENDER_WINDOW_S``)."""

    __tablename__ = "email_sender_window"

    sender: Mapped[str] = mapped_column(String(320), primary_key=True)
    window_start: Mapped[datetime] = mapped_column(primary_key=True, index=True)
    count: Mapped[int] = mapped_column(default=0)
