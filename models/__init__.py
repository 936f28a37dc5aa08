"""Typed SQLAlchemy models (one module per aggregate), the engine factory and the wire schemas."""

from models.access import ApiToken, ServiceKey
from models.base import Base
from models.catalogue import Category, EventClass, EventProperty, EventType
from models.documents import DocumentBlob, EventDocument
from models.events import CrmEvent, EventParticipant, EventPropertyLink, FollowUp
from models.ledger import Delivery, FailedMessage, InboundMessage, RejectedMessage
from models.mail import EmailSenderWindow
from models.parties import (
    Contact,
    ContactEmail,
    Customer,
    CustomerDomain,
    EventPartyKey,
    Lead,
    PartyPhone,
    Staff,
)
from models.privacy import ErasedIdentifier, Erasure
from models.targets import (
    ReconcileRun,
    RefreshRequest,
    ReportRun,
    SellerView,
    Tally,
    Target,
)

__all__ = [
    "ApiToken",
    "Base",
    "Category",
    "Contact",
    "ContactEmail",
    "CrmEvent",
    "Customer",
    "CustomerDomain",
    "Delivery",
    "DocumentBlob",
    "EmailSenderWindow",
    "ErasedIdentifier",
    "Erasure",
    "EventClass",
    "EventDocument",
    "EventParticipant",
    "EventPartyKey",
    "EventProperty",
    "EventPropertyLink",
    "EventType",
    "FailedMessage",
    "FollowUp",
    "InboundMessage",
    "Lead",
    "PartyPhone",
    "ReconcileRun",
    "RefreshRequest",
    "RejectedMessage",
    "ReportRun",
    "SellerView",
    "ServiceKey",
    "Staff",
    "Tally",
    "Target",
]
