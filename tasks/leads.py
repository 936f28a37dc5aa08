"""Leads: an inbound call or email from an unknown party becomes a lead, once per party.

The rule is on for emails to the lead plus-address (``crm+lead@``, which classifies as lead)
and, by configuration, for every inbound call (``CRM_LEAD_FROM_UNKNOWN_CALLS``) or email
(``CRM_LEAD_FROM_UNKNOWN_EMAILS``) from a number or address that matches no contact or customer.
The ``lead`` table holds one row per normalised number or address, so the same unknown party
never creates a second lead, also when two of its calls are processed at the same moment.
See docs/master-data.md.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.base import utcnow
from models.db import upsert_insert
from models.events import CrmEvent, EventPropertyLink
from models.parties import EventPartyKey, Lead
from tasks.classify import ClassificationRequest, classify
from tasks.context import StageContext
from tasks.store import set_properties

LEAD = "lead"
#: The party of a lead: the caller's number, the (original) sender's address.
LEAD_KEY_KIND = {"call": "phone", "email": "email"}


def apply_lead_rule(
    session: Session,
    ctx: StageContext,
    event: CrmEvent,
    *,
    requested_category: str | None = None,
    new: bool = False,
) -> None:
    """Decide whether ``event`` is its party's lead; called by the call and email stages after
    matching and classifying, once the event's party keys are recorded and its party checked
    again under their locks (``tasks.relink.recheck_open_event``), and by the re-link after it
    derived a call again.

    ``requested_category`` is the category the message itself named (calls): an accepted
    category from the message is never overridden. ``new``: the event was created by this
    stage, so it cannot be a lead yet and, when it is linked or outbound, never becomes one.
    """
    kind = LEAD_KEY_KIND.get(event.source_kind)
    if kind is None:
        return
    if new and (event.direction != "inbound" or event.link_state != "unlinked"):
        return
    party = session.scalar(
        select(EventPartyKey.value)
        .where(EventPartyKey.event_id == event.id, EventPartyKey.kind == kind)
        .order_by(EventPartyKey.position)
        .limit(1)
    )
    if party is None:
        return
    explicit = bool(requested_category) and requested_category == event.category_code
    lead = session.scalar(select(Lead).where(Lead.kind == kind, Lead.value == party))
    if lead is not None and lead.event_id == event.id:
        # A later update of the lead event itself: it stays the lead, whatever is known now
        # (unless the message itself now names another category).
        if not explicit or event.category_code == LEAD:
            _classify_as_lead(session, event, f"{party} became a lead with this event")
        return
    if event.direction != "inbound" or event.link_state != "unlinked":
        return
    enabled = {
        "call": ctx.settings.lead_from_unknown_calls,
        "email": ctx.settings.lead_from_unknown_emails,
    }[event.source_kind]
    if not (enabled or event.category_code == LEAD):
        return
    if explicit and event.category_code != LEAD:
        return  # the message chose another category: not a lead
    if lead is None:
        inserted = session.execute(
            upsert_insert(session, Lead.__table__)
            .values(kind=kind, value=party, event_id=event.id, created_at=utcnow())
            .on_conflict_do_nothing(index_elements=["kind", "value"])
            .returning(Lead.id)
        ).scalar()
        if inserted is not None:
            if not explicit:
                _classify_as_lead(session, event, f"unknown party {party}: first contact")
            return
        lead = session.scalar(select(Lead).where(Lead.kind == kind, Lead.value == party))
    already = f"#{lead.event_id}" if lead and lead.event_id else "(deleted)"
    note = f"not a second lead: {party} is already lead event {already}"
    if event.category_code == LEAD and not explicit:
        _classify(session, event, None, note)
    elif note not in event.classification_note:
        event.classification_note = "; ".join(p for p in (event.classification_note, note) if p)


def _classify_as_lead(session: Session, event: CrmEvent, reason: str) -> None:
    if event.category_code == LEAD:
        note = f"lead: {reason}"
        if note not in event.classification_note:
            event.classification_note = "; ".join(p for p in (event.classification_note, note) if p)
        return
    _classify(session, event, LEAD, reason)


def _classify(session: Session, event: CrmEvent, category: str | None, reason: str) -> None:
    """Classify again with the lead rule's verdict; properties are kept."""
    properties = tuple(
        session.scalars(
            select(EventPropertyLink.property_code).where(EventPropertyLink.event_id == event.id)
        )
    )
    classification = classify(
        session,
        ClassificationRequest(
            source_kind=event.source_kind,
            properties=properties,
            rule_category=category,
            rule_reason=reason,
        ),
    )
    classification.apply_to(event)
    notes = [classification.note]
    if category is None:
        notes.append(reason)
    event.classification_note = "; ".join(n for n in notes if n)
    session.flush()
    set_properties(session, event, classification.properties)
