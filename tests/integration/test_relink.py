"""Master data through the real worker: the re-link reaches the seller views within a second,
and the import, triage, link and history commands on the production wiring."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import func, select

from models.events import CrmEvent
from models.parties import Customer, Lead, Staff
from models.targets import Tally
from tasks.triage import triage_rows
from tasks.views import events_json
from tests.conftest import load_example
from tests.integration.conftest import LiveSystem
from tests.master_data import contact, inbound_call, raw_email

pytestmark = pytest.mark.integration

#: Numbers and periods used by nothing else in the suite (December 2026).
NUMBER = "+358 40 888 7766"


@pytest.fixture(scope="module")
def parties(live: LiveSystem) -> LiveSystem:
    outcomes = live.publish("party", load_example("parties.json"))
    assert {d.outcome for d in outcomes} == {"done"}
    return live


def tally_of(live: LiveSystem, username: str, category: str, period: str) -> int:
    with live.sessions() as session:
        return (
            session.scalar(
                select(Tally.count)
                .join(Staff, Staff.id == Tally.seller_id)
                .where(
                    Staff.username == username,
                    Tally.category_code == category,
                    Tally.period == period,
                )
            )
            or 0
        )


def events_of(live: LiveSystem, ids: list[int]) -> list[dict[str, Any]]:
    with live.sessions() as session:
        events = list(session.scalars(select(CrmEvent).where(CrmEvent.id.in_(ids))))
        return events_json(session, sorted(events, key=lambda e: e.id))


def wait_until_counted(live: LiveSystem, username: str, period: str, expected: int) -> None:
    """Until the seller's tally is recomputed (how fast is bench/refresh.py's to measure)."""
    deadline = time.monotonic() + 60
    while tally_of(live, username, "crm_event", period) != expected:
        assert time.monotonic() < deadline, f"tally not refreshed; worker log:\n{live.tail()}"
        time.sleep(0.02)


def test_a_contact_gaining_a_number_links_earlier_calls_and_the_view_follows_within_a_second(
    parties: LiveSystem, redis_database: str
) -> None:
    live = parties
    calls = [
        inbound_call(f"it-relink-{n}", NUMBER, f"2026-12-0{n}T10:00:00+02:00") for n in (1, 2, 3)
    ]
    stored = live.publish("call", calls)
    ids = [d.event_id for d in stored if d.event_id is not None]
    assert len(ids) == 3
    assert {e["link_state"] for e in events_of(live, ids)} == {"unlinked"}

    triage = live.cli("triage", "--json")
    assert triage.returncode == 0, triage.stderr
    listed = {r["id"]: r for r in json.loads(triage.stdout)}
    assert set(ids) <= set(listed)
    assert listed[ids[0]]["tried"]["numbers"] == ["+358408887766"]

    client = redis.Redis.from_url(redis_database)
    subscriber = client.pubsub()
    subscriber.subscribe("crm.seller.mikko")
    confirmation = subscriber.get_message(timeout=30)
    assert confirmation is not None and confirmation["type"] == "subscribe"
    try:
        (done,) = live.publish("party", [contact("10002", "Pasi Pohjanen", phones=[NUMBER])])
        assert done.outcome == "done"
        assert f"re-linked 3 event(s): {', '.join(map(str, sorted(ids)))}" in done.detail
        wait_until_counted(live, "mikko", "2026-W49", 3)
        assert tally_of(live, "mikko", "crm_event", "2026-12") >= 3
        message = subscriber.get_message(timeout=30)
        assert message is not None and json.loads(message["data"])["seller"] == "mikko"
    finally:
        subscriber.close()
        client.close()
    for event in events_of(live, ids):
        assert (event["link_state"], event["customer_number"], event["contact"]) == (
            "linked",
            "10002",
            "Pasi Pohjanen",
        )
        assert event["seller"] == "mikko"

    history = live.cli("history", "10002", "--json")
    assert history.returncode == 0, history.stderr
    document = json.loads(history.stdout)
    shown = [e for e in document["events"] if e["id"] in ids]
    # Newest first (the three calls were on 1, 2 and 3 December).
    assert [e["source_id"] for e in shown] == ["it-relink-3", "it-relink-2", "it-relink-1"]
    assert all(e["staff"] == ["mikko"] for e in shown)
    assert "Pasi Pohjanen" in {c["name"] for c in document["contacts"]}


def test_link_by_hand_from_the_command_line(parties: LiveSystem) -> None:
    live = parties
    (stored,) = live.publish(
        "call", [inbound_call("it-by-hand", "+358 40 111 0000", "2026-12-10T10:00:00+02:00")]
    )
    assert stored.event_id is not None
    refused = live.cli("link", str(stored.event_id), "--customer", "10001", "--contact", "Nobody")
    assert refused.returncode == 1
    assert refused.stderr.startswith("crm-events: customer 10001 has no contact 'Nobody'; its")
    assert "Traceback" not in refused.stderr

    before = tally_of(live, "anna", "crm_event", "2026-W50")
    result = live.cli(
        "link", str(stored.event_id), "--customer", "10001", "--contact", "Liisa Korhonen", "--json"
    )
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)
    assert (row["customer_number"], row["contact"], row["seller"], row["linked_by"]) == (
        "10001",
        "Liisa Korhonen",
        "anna",
        "hand",
    )
    deadline = time.monotonic() + 5
    while tally_of(live, "anna", "crm_event", "2026-W50") != before + 1:
        assert time.monotonic() < deadline, "the hand link's refresh did not arrive"
        time.sleep(0.05)
    with live.sessions() as session:
        assert stored.event_id not in {r["id"] for r in triage_rows(session)}


BAD_CSV = (
    "kind,customer_number,username,name,email,phones,seller\n"
    "customer,40001,,Kuopion Kone Oy,,017 444 0000,mikko\n"
    "contact,40001,,Kalle Kone,kalle(at)kuopionkone.fi,,\n"
    "staff,,,Nimetön,,,\n"
)


def test_import_of_a_file_with_bad_rows_imports_nothing(
    parties: LiveSystem, tmp_path: Path
) -> None:
    path = tmp_path / "erp.csv"
    path.write_text(BAD_CSV, encoding="utf-8")
    result = parties.cli("import", "parties", str(path), "--json")
    assert result.returncode == 1
    summary = json.loads(result.stdout)
    assert [(e["row"], sorted(e["errors"])) for e in summary["errors"]] == [
        (3, ["email"]),
        (4, ["username"]),
    ]
    assert "row 3: invalid message: email: Not a valid email address." in result.stderr
    assert "nothing imported" in result.stderr and "Traceback" not in result.stderr
    with parties.sessions() as session:
        assert session.scalar(select(Customer).where(Customer.customer_number == "40001")) is None

    fixed = BAD_CSV.replace("kalle(at)", "kalle@").replace("staff,,,", "staff,,kalle.k,")
    path.write_text(fixed, encoding="utf-8")
    (stored,) = parties.publish(
        "call", [inbound_call("it-import", "017 444 0000", "2026-12-15T10:00:00+02:00")]
    )
    before = tally_of(parties, "mikko", "crm_event", "2026-W51")
    result = parties.cli("import", "parties", str(path), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["imported"] == {"customer": 1, "contact": 1, "staff": 1}
    assert summary["relinked_events"] == [stored.event_id]
    assert "importing erp.csv" in result.stderr  # the progress bar, on stderr
    deadline = time.monotonic() + 5
    while tally_of(parties, "mikko", "crm_event", "2026-W51") != before + 1:
        assert time.monotonic() < deadline, "the import's refresh did not arrive"
        time.sleep(0.05)


def test_two_emails_from_one_unknown_sender_to_the_lead_address_make_one_lead(
    parties: LiveSystem,
) -> None:
    messages = []
    for n in (1, 2):
        raw = raw_email(
            "Liidi Lahtinen <liidi@esimerkki.example>",
            "crm+lead@myyntitalo.fi",
            f"Tarjouspyyntö {n}",
            f"it-lead-{n}@esimerkki.example",
        )
        messages.append(
            {
                "schema": "crm.email/1",
                "source_system": "smtp-gw",
                "raw_b64": base64.b64encode(raw).decode("ascii"),
                "rcpt_to": ["crm+lead@myyntitalo.fi"],
            }
        )
    # Published together: two worker processes may take them at the same moment.
    outcomes = parties.publish("email", messages)
    assert [d.outcome for d in outcomes] == ["stored", "stored"]
    ids = [d.event_id for d in outcomes if d.event_id is not None]
    categories = sorted(e["category"] for e in events_of(parties, ids))
    assert categories == ["crm_event", "lead"]
    with parties.sessions() as session:
        assert (
            session.scalar(
                select(func.count())
                .select_from(Lead)
                .where(Lead.value == "liidi@esimerkki.example")
            )
            == 1
        )
