"""Parties: customers (asiakas), their contacts (yhteyshenkilö) and our staff (henkilökunta).

Also what ties events to parties that were not known when the event arrived: the outside
numbers and addresses an event was matched by (for the automatic re-link), and the leads
created by unknown parties.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Index, String, UniqueConstraint
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


class ContactEmail(Base):
    """An email address of a contact, lower-cased; the primary address (``Contact.email``) too.

    A contact may have several addresses; any of them matches the contact.
    """

    __tablename__ = "contact_email"
    __table_args__ = (UniqueConstraint("contact_id", "email"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    contact_id: Mapped[int] = mapped_column(ForeignKey("contact.id", ondelete="CASCADE"))
    email: Mapped[str] = mapped_column(String(320), index=True)


class EventPartyKey(Base):
    """An outside party an event was matched by: an E.164 number, an address, a domain.

    Kept so that when a contact or customer later gains that number, address or domain, the
    unlinked and ambiguous events it explains are found by index, not by scanning every event.
    """

    __tablename__ = "event_party_key"
    __table_args__ = (Index("ix_event_party_key_kind_value", "kind", "value"),)

    event_id: Mapped[int] = mapped_column(
        ForeignKey("crm_event.id", ondelete="CASCADE"), primary_key=True
    )
    #: phone | email | domain | customer (a customer number named by a visit)
    kind: Mapped[str] = mapped_column(String(10), primary_key=True)
    value: Mapped[str] = mapped_column(String(320), primary_key=True)
    #: Order within the event: the first phone or address is the party the event is about.
    position: Mapped[int] = mapped_column(default=0)


class Lead(Base):
    """An unknown party that has become a lead: one per number or address, ever.

    The unique key is what guarantees that the same unknown party never creates a second lead,
    also when two of its calls are processed at the same moment.
    """

    __tablename__ = "lead"
    __table_args__ = (UniqueConstraint("kind", "value"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    #: phone | email
    kind: Mapped[str] = mapped_column(String(10))
    value: Mapped[str] = mapped_column(String(320))
    #: The lead event; null when that event was deleted (the party stays a lead).
    event_id: Mapped[int | None] = mapped_column(
        ForeignKey("crm_event.id", ondelete="SET NULL"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
