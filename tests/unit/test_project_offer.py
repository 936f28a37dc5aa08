"""The ERP's project and offer on events (Lemonsoft's CRM event carries both): in calls, visits
and emails alike, kept by the call's fold, the visit's latest message, shown in the event JSON
and searched by number; and a memo that arrived is done (Valmis)."""

from __future__ import annotations

import base64
import uuid
from dataclasses import replace
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy.orm import Session

from models.events import CrmEvent
from tasks.context import StageContext
from tasks.errors import BadInput
from tasks.ingest.call import ingest_call
from tasks.ingest.email import ingest_email
from tasks.ingest.visit import ingest_visit
from tasks.search import EventFilters, search_events
from tasks.views import events_json
from tests.conftest import ROOT, load_example
from tests.messages import outbound_call

HELSINKI = ZoneInfo("Europe/Helsinki")
ERP = {
    "project_number": "P-2027-14",
    "project_name": "Huoltosopimus 2027",
    "offer_number": "T-2026-118",
    "offer_url": "https://erp.myyntitalo.fi/offers/T-2026-118",
}


def test_a_call_keeps_the_project_an_update_named(world: Session, ctx: StageContext) -> None:
    first = {**outbound_call("po-1", "2026-11-24T09:00:00+02:00"), "status": "answered"}
    ingest_call(world, ctx, first)
    # The ERP's numbers come with the last update; a later one without them keeps them.
    last = {**outbound_call("po-1", "2026-11-24T09:00:00+02:00"), **ERP, "sequence": 2}
    stored = ingest_call(world, replace(ctx, task_id=str(uuid.uuid4())), last)
    event = world.get(CrmEvent, stored.event_id)
    assert event is not None
    [shown] = events_json(world, [event], HELSINKI)
    assert {k: shown[k] for k in ERP} == ERP
    for filters in (EventFilters(project="P-2027-14"), EventFilters(offer="T-2026-118")):
        found = search_events(world, filters, HELSINKI, limit=10).events
        assert [e.id for e in found] == [event.id]
    assert search_events(world, EventFilters(project="P-0"), HELSINKI, limit=10).events == []


def test_a_visit_shows_its_latest_message_s_project(world: Session, ctx: StageContext) -> None:
    visit = {**load_example("visits/visit-with-memo.json"), **ERP}
    stored = ingest_visit(world, ctx, visit)
    event = world.get(CrmEvent, stored.event_id)
    assert event is not None and event.offer_number == "T-2026-118"
    updated = {**visit, "project_number": None, "offer_number": None, "offer_url": None}
    ingest_visit(world, replace(ctx, task_id=str(uuid.uuid4())), updated)
    world.refresh(event)
    assert (event.project_number, event.project_name, event.offer_number) == (
        None,
        "Huoltosopimus 2027",
        None,
    )


def test_an_email_carries_them_in_its_envelope_and_is_done(
    world: Session, ctx: StageContext
) -> None:
    raw = (ROOT / "examples" / "emails" / "bcc-offer-with-pdf.eml").read_bytes()
    message = {
        "schema": "crm.email/1",
        "source_system": "smtp-gateway",
        "raw_b64": base64.b64encode(raw).decode(),
        **ERP,
    }
    event = world.get(CrmEvent, ingest_email(world, ctx, message).event_id)
    assert event is not None
    assert (event.project_number, event.offer_url, event.status) == (
        "P-2027-14",
        ERP["offer_url"],
        "done",
    )


def test_an_offer_link_is_a_web_address(world: Session, ctx: StageContext) -> None:
    message = {
        **outbound_call("po-2", "2026-11-24T09:00:00+02:00"),
        "offer_url": "file:///etc/passwd",
    }
    with pytest.raises(BadInput) as raised:
        ingest_call(world, ctx, message)
    assert "offer_url: Not a valid URL." in raised.value.reason
