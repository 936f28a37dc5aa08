"""Marshmallow schemas of the v1 wire messages (DESIGN §6): validated once, at ingest."""

from models.schemas.call import CallMessageSchema
from models.schemas.common import MessageInvalid, load_message
from models.schemas.email import EmailMessageSchema
from models.schemas.party import load_party_message
from models.schemas.visit import VisitMessageSchema

__all__ = [
    "CallMessageSchema",
    "EmailMessageSchema",
    "MessageInvalid",
    "VisitMessageSchema",
    "load_message",
    "load_party_message",
]
