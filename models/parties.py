"""Parties: customers (asiakas), their contacts (yhteyshenkilö) and our staff (henkilökunta)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, utcnow


class Staff(Base):
    __tablename__ = "staff"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(100), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    email: Mapped[str | None] = mapped_column(String(320), index=True)
    extension: Mapped[str | None] = mapped_column(String(20), index=True)
    role: Mapped[str] = mapped_column(String(20), default="seller")
    manager_id: Mapped[int | None] = mapped_column(ForeignKey("staff.id"), index=True)
    time_zone: Mapped[str] = mapped_column(String(64), default="Europe/Helsinki")
    active: Mapped[bool] = mapped_column(default=True)
    #: Created from a reference (a customer's seller, a manager) before its own message arrived.
    placeholder: Mapped[bool] = mapped_column(default=False)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Customer(Base):
    __tablename__ = "customer"

    id: Mapped[int] = mapped_column(primary_key=True)
    customer_number: Mapped[str] = mapped_column(String(40), unique=True)
    name: Mapped[str] = mapped_column(String(300))
    #: The responsible seller: gets events where no staff member is identified.
    seller_id: Mapped[int | None] = mapped_column(ForeignKey("staff.id"), index=True)
    placeholder: Mapped[bool] = mapped_column(default=False)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Contact(Base):
    __tablename__ = "contact"
    __table_args__ = (UniqueConstraint("customer_id", "contact_key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customer.id"), index=True)
    #: Natural key within the customer: the lower-cased email, else ``name:<name>``.
    contact_key: Mapped[str] = mapped_column(String(400))
    name: Mapped[str] = mapped_column(String(300))
    email: Mapped[str | None] = mapped_column(String(320), index=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class CustomerDomain(Base):
    """An email domain of a customer; free-mail domains are never stored here."""

    __tablename__ = "customer_domain"
    __table_args__ = (UniqueConstraint("domain", "customer_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    domain: Mapped[str] = mapped_column(String(255), index=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customer.id"), index=True)


class PartyPhone(Base):
    """A phone number of exactly one party, normalised to E.164 with the raw string kept."""

    __tablename__ = "party_phone"

    id: Mapped[int] = mapped_column(primary_key=True)
    e164: Mapped[str] = mapped_column(String(32), index=True)
    raw: Mapped[str] = mapped_column(String(64))
    customer_id: Mapped[int | None] = mapped_column(ForeignKey("customer.id"), index=True)
    contact_id: Mapped[int | None] = mapped_column(ForeignKey("contact.id"), index=True)
    staff_id: Mapped[int | None] = mapped_column(ForeignKey("staff.id"), index=True)
