"""One call's updates delivered at the same moment to several worker processes, many times.

A second worker process (concurrency 4) joins the session's worker (concurrency 2) on the call
queue; every call's updates are published back to back, so they are taken by different
processes at once, the very first insert of the call's event included. The row lock on the
event (tasks.store.lock_event) must serialise them: one event per call, whose final fold saw
every update.
"""

from __future__ import annotations

import random
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from config.queues import TASK_QUEUES
from models.events import CrmEvent, FollowUp
from tasks.views import events_json
from tests.conftest import ROOT, load_example
from tests.integration.conftest import LiveSystem
from tests.processes import stop_process, wait_for_worker
from workers.publish import wait_for

pytestmark = pytest.mark.integration

CALLS = 30
CALLER = "040 700 0001"
SWITCHBOARD = "+358 9 111 000"


@pytest.fixture(scope="module")
def second_worker(live: LiveSystem) -> Iterator[subprocess.Popen[bytes]]:
    # A customer of these tests' own, so that their many calls stay out of the others' way.
    parties = [
        *load_example("parties.json"),
        {
            "schema": "crm.party/1",
            "source_system": "erp",
            "kind": "customer",
            "customer_number": "30001",
            "name": "Rinnakkain Oy",
            "seller": "anna",
        },
        {
            "schema": "crm.party/1",
            "source_system": "erp",
            "kind": "contact",
            "customer_number": "30001",
            "name": "Paavo Rinne",
            "email": "paavo@rinnakkain.fi",
            "phones": [CALLER],
        },
    ]
    assert {d.outcome for d in live.publish("party", parties)} == {"done"}
    name = f"parallel-{uuid.uuid4().hex[:6]}@test"
    log = live.settings.data_dir / "second-worker.log"
    with open(log, "wb") as handle:
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "workers.cli",
                "worker",
                "-Q",
                "crm.ingest.call,crm.refresh",
                "--concurrency",
                "4",
                "--hostname",
                name,
            ],
            env=live.env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
    wait_for_worker(live.app, worker, log.read_text, name)
    try:
        yield worker
    finally:
        stop_process(worker)
        worker.log_text = log.read_text()  # type: ignore[attr-defined]


def five_updates(call_id: str, start: datetime) -> list[dict[str, Any]]:
    base = {"schema": "crm.call/1", "source_system": "pbx-par", "call_id": call_id}
    numbers = {"direction": "inbound", "from": CALLER, "to": SWITCHBOARD, "agent": "201"}
    return [
        {**base, **numbers, "sequence": 1, "status": "ringing", "started_at": start.isoformat()},
        {
            **base,
            **numbers,
            "sequence": 2,
            "status": "answered",
            "answered_at": (start + timedelta(seconds=6)).isoformat(),
        },
        {**base, "note": f"Muistio {call_id}", "properties": ["advisory"]},
        {**base, "sequence": 3, "status": "transferred"},
        {
            **base,
            "sequence": 4,
            "status": "completed",
            "ended_at": (start + timedelta(seconds=306)).isoformat(),
            "duration_s": 300,
        },
    ]


def publish_at_once(live: LiveSystem, messages: list[dict[str, Any]]) -> list[str]:
    ids = []
    for message in messages:
        task_id = str(uuid.uuid4())
        live.app.send_task(
            "crm.ingest.call", args=[message], task_id=task_id, queue=TASK_QUEUES["crm.ingest.call"]
        )
        ids.append(task_id)
    return ids


def test_parallel_delivery_gives_one_event_per_call_with_every_update_merged(
    live: LiveSystem, second_worker: subprocess.Popen[bytes]
) -> None:
    rng = random.Random(4)
    start = datetime.fromisoformat("2026-11-23T09:00:00+02:00")
    messages: list[dict[str, Any]] = []
    for n in range(CALLS):
        updates = five_updates(f"par-{n:03d}", start + timedelta(minutes=n))
        # Each call's updates back to back, shuffled, two of them twice.
        batch = [*updates, *rng.sample(updates, 2)]
        rng.shuffle(batch)
        messages += batch
    task_ids = publish_at_once(live, messages)
    done = wait_for(live.sessions, task_ids, 120)
    assert len(done) == len(task_ids), f"not all processed; worker log:\n{live.tail()}"
    assert Counter(d.outcome for d in done.values()) == {
        "stored": CALLS * 5,
        "duplicate": CALLS * 2,
    }

    with live.sessions() as session:
        events = session.scalars(
            select(CrmEvent).where(CrmEvent.source_system == "pbx-par").order_by(CrmEvent.id)
        ).all()
        assert sorted(e.source_id for e in events) == [f"par-{n:03d}" for n in range(CALLS)]
        for stored_event in events:
            # The last transaction to hold the row lock saw all five updates.
            assert stored_event.details["updates"] == 5, stored_event.source_id
        for event in events_json(session, list(events)):
            assert event["status"] == "completed", event["source_id"]
            assert event["duration_s"] == 300
            assert event["contact"] == "Paavo Rinne"
            assert event["seller"] == "anna"
            assert event["body"] == f"Muistio {event['source_id']}"
            assert event["properties"] == ["advisory"]
            assert "provider statuses kept raw: transferred" in event["match_note"]
    # Both workers took part; no update needed a retry to get past another.
    second_log = (live.settings.data_dir / "second-worker.log").read_text()
    assert "crm.ingest.call" in second_log and "succeeded" in second_log
    assert "crm.ingest.call: transient error" not in second_log + live.tail(5000)


def test_a_missed_call_and_its_callback_processed_at_once(
    live: LiveSystem, second_worker: subprocess.Popen[bytes]
) -> None:
    """Follow-ups of one customer are serialised too: each miss ends closed by its callback."""
    messages = []
    for n in range(10):
        missed_at = datetime.fromisoformat("2026-12-01T09:00:00+02:00") + timedelta(days=n)
        base = {"schema": "crm.call/1", "source_system": "pbx-fu"}
        messages += [
            {
                **base,
                "call_id": f"miss-{n}",
                "status": "missed",
                "direction": "inbound",
                "from": CALLER,
                "to": SWITCHBOARD,
                "started_at": missed_at.isoformat(),
            },
            {
                **base,
                "call_id": f"back-{n}",
                "status": "completed",
                "direction": "outbound",
                "from": "201",
                "to": "+358 40 700 0001",
                "agent": "anna",
                "started_at": (missed_at + timedelta(minutes=30)).isoformat(),
            },
        ]
    task_ids = publish_at_once(live, messages)
    assert len(wait_for(live.sessions, task_ids, 120)) == len(task_ids)
    with live.sessions() as session:
        ids = dict(
            session.execute(
                select(CrmEvent.source_id, CrmEvent.id).where(CrmEvent.source_system == "pbx-fu")
            ).all()
        )
        for n in range(10):
            follow_up = session.scalar(
                select(FollowUp).where(FollowUp.event_id == ids[f"miss-{n}"])
            )
            assert follow_up is not None
            assert (follow_up.state, follow_up.closed_by_event_id) == ("closed", ids[f"back-{n}"])
