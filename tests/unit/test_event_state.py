"""The CRM status (Lemonsoft's "tila") of every event: done (valmis) unless a message says
otherwise, open for a call or a mail that still needs work, scheduled or cancelled for a visit;
kept beside a call's telephony status, searched, and shown as the seller reads it."""

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
from tasks.search import EventFilters, resolve_filters, search_events
from tasks.views import events_json
from tests.conftest import ROOT, load_example
from tests.messages import outbound_call
from tests.unit.test_tallies import tallies
from workers.render import status_words

HELSINKI = ZoneInfo("Europe/Helsinki")


def fresh(ctx: StageContext) -> StageContext:
    return replace(ctx, task_id=str(uuid.uuid4()))


def stored(world: Session, event_id: int | None) -> CrmEvent:
    event = world.get(CrmEvent, event_id)
    assert event is not None
    world.refresh(event)
    return event


def test_a_call_is_done_unless_an_update_says_open(world: Session, ctx: StageContext) -> None:
    done = ingest_call(world, ctx, outbound_call("st-1", "2026-11-24T09:00:00+02:00"))
    event = stored(world, done.event_id)
    [shown] = events_json(world, [event], HELSINKI)
    assert (shown["state"], shown["status"]) == ("done", "completed")
    assert status_words(shown) == "done · completed"

    call = outbound_call("st-2", "2026-11-24T10:00:00+02:00")
    first = ingest_call(world, fresh(ctx), {**call, "status": "answered", "state": "open"})
    # A later update without a state keeps it; one with a state moves it.
    ingest_call(world, fresh(ctx), {**call, "sequence": 2})
    assert stored(world, first.event_id).state == "open"
    ingest_call(world, fresh(ctx), {**call, "sequence": 3, "state": "done"})
    assert stored(world, first.event_id).state == "done"


def test_a_call_cannot_be_scheduled_or_cancelled(world: Session, ctx: StageContext) -> None:
    message = {**outbound_call("st-3", "2026-11-24T09:00:00+02:00"), "state": "cancelled"}
    with pytest.raises(BadInput) as raised:
        ingest_call(world, ctx, message)
    assert "state: Must be one of: open, done." in raised.value.reason


def test_a_visit_may_be_scheduled_open_or_cancelled(world: Session, ctx: StageContext) -> None:
    visit = load_example("visits/visit-with-memo.json")
    event = stored(world, ingest_visit(world, ctx, {**visit, "state": "scheduled"}).event_id)
    assert (event.state, event.status, event.cancelled) == ("scheduled", "scheduled", False)
    seller = event.seller_id
    assert seller is not None
    assert len(tallies(world, seller)) == 2  # it counts: its week and its month
    # "cancelled" as the state is the same as cancelled: true: it stops counting.
    ingest_visit(world, fresh(ctx), {**visit, "state": "cancelled"})
    event = stored(world, event.id)
    assert (event.state, event.status, event.cancelled) == ("cancelled", "cancelled", True)
    assert tallies(world, seller) == {}
    ingest_visit(world, fresh(ctx), visit)  # the app sends it again without a state: done
    assert (stored(world, event.id).state, stored(world, event.id).cancelled) == ("done", False)


def test_an_email_is_done_or_what_its_envelope_says(world: Session, ctx: StageContext) -> None:
    raw = (ROOT / "examples" / "emails" / "bcc-offer-with-pdf.eml").read_bytes()
    message = {
        "schema": "crm.email/1",
        "source_system": "smtp-gateway",
        "raw_b64": base64.b64encode(raw).decode(),
        "state": "open",
    }
    event = stored(world, ingest_email(world, ctx, message).event_id)
    assert (event.state, event.status) == ("open", "open")
    assert status_words(events_json(world, [event], HELSINKI)[0]) == "open"


def test_events_are_searched_by_state_in_either_language(world: Session, ctx: StageContext) -> None:
    call = outbound_call("st-4", "2026-11-24T09:00:00+02:00")
    open_call = ingest_call(world, ctx, {**call, "state": "open"}).event_id
    ingest_call(world, fresh(ctx), outbound_call("st-5", "2026-11-24T11:00:00+02:00"))
    for wanted in ("open", "Kesken"):
        filters = resolve_filters(world, EventFilters(state=wanted))
        found = search_events(world, filters, HELSINKI, limit=10).events
        assert [e.id for e in found] == [open_call]
    with pytest.raises(BadInput) as raised:
        resolve_filters(world, EventFilters(state="finished"))
    assert raised.value.reason == (
        "no state 'finished': the state is one of open (kesken), scheduled (sovittu), "
        "done (valmis), cancelled (peruttu)"
    )
