"""Typed SQLAlchemy models (one module per aggregate), the engine factory and the wire schemas."""

from models.base import Base
from models.catalogue import Category, EventClass, EventProperty, EventType
from models.documents import DocumentBlob, EventDocument
from models.events import CrmEvent, EventParticipant, EventPropertyLink, FollowUp
from models.ledger import Delivery, FailedMessage, InboundMessage, RejectedMessage
from models.parties import Contact, Customer, CustomerDomain, PartyPhone, Staff
from models.targets import (
    ReconcileRun,
    RefreshRequest,
    ReportRun,
    SellerCard,
    Tally,
    TallyTouch,
    Target,
)

__all__ = [
    "Base",
    "Category",
    "Contact",
    "CrmEvent",
    "Customer",
    "CustomerDomain",
    "Delivery",
    "DocumentBlob",
    "EventClass",
    "EventDocument",
    "EventParticipant",
    "EventProperty",
    "EventPropertyLink",
    "EventType",
    "FailedMessage",
    "FollowUp",
    "InboundMessage",
    "PartyPhone",
    "ReconcileRun",
    "RefreshRequest",
    "RejectedMessage",
    "ReportRun",
    "SellerCard",
    "Staff",
    "Tally",
    "TallyTouch",
    "Target",
]
