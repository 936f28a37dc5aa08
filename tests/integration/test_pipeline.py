"""publish → real broker (Redis) → real worker process → PostgreSQL, as in production."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select

from models.events import CrmEvent
from models.parties import Staff
from models.targets import RefreshRequest, Tally
from tasks.views import events_json, seller_cards, staff_by_username
from tests.conftest import EXAMPLES, load_example
from tests.integration.conftest import LiveSystem
from tests.messages import outbound_call

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def loaded(live: LiveSystem) -> LiveSystem:
    outcomes = live.publish("party", load_example("parties.json"))
    assert {d.outcome for d in outcomes} == {"done"}
    return live


def event_by_source_id(live: LiveSystem, source_id: str) -> dict:
    with live.sessions() as session:
        events = session.scalars(select(CrmEvent).where(CrmEvent.source_id == source_id)).all()
        assert len(events) == 1, f"{len(events)} events for {source_id}"
        return events_json(session, list(events), live.settings.zone)[0]


def test_publish_wait_gives_one_event_for_three_call_updates(loaded: LiveSystem) -> None:
    result = loaded.cli(
        "publish", "call", str(EXAMPLES / "calls/inbound-answered.json"), "--wait", "60", "--json"
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["outcome"] for r in rows] == ["stored"] * 3
    assert len({r["event_id"] for r in rows}) == 1
    event = event_by_source_id(loaded, "c-2026-11-23-0001")
    assert event["customer_number"] == "10001"
    assert event["contact"] == "Matti Virtanen"
    assert event["seller"] == "anna"
    assert event["category"] == "crm_event"
    assert event["status"] == "completed"
    assert event["duration_s"] == 448
    assert event["body"].startswith("Kysyi huoltosopimuksen")


def test_tallies_and_cards_refresh_within_a_second_and_notify(
    loaded: LiveSystem, redis_database: str
) -> None:
    client = redis.Redis.from_url(redis_database)
    with loaded.sessions() as session:
        anna = session.scalar(select(Staff.id).where(Staff.username == "anna"))
    subscriber = client.pubsub()
    # DESIGN §5 names the channel by the seller's id; screens that know the username use that.
    subscriber.subscribe("crm.seller.anna", f"crm.seller.{anna}")
    confirmed = 0
    while confirmed < 2:  # the subscribe confirmations
        reply = subscriber.get_message(timeout=30)
        assert reply is not None, "Redis did not confirm the subscriptions"
        confirmed += reply["type"] == "subscribe"
    loaded.publish("call", load_example("calls/outbound-sales-action.json"))
    # How fast this happens is bench/refresh.py's to measure; here, that it happens.
    deadline = time.monotonic() + 60
    while True:
        with loaded.sessions() as session:
            count = session.scalar(
                select(Tally.count).where(
                    Tally.category_code == "sales_action", Tally.period == "2026-W48"
                )
            )
            pending = session.scalar(select(func.count()).select_from(RefreshRequest))
        if count == 1 and pending == 0:
            break
        assert time.monotonic() < deadline, "the tally did not move"
        time.sleep(0.02)
    channels = set()
    for _ in range(2):
        message = subscriber.get_message(timeout=30)
        assert message is not None and message["type"] == "message"
        assert json.loads(message["data"])["seller"] == "anna"
        assert json.loads(message["data"])["seller_id"] == anna
        channels.add(message["channel"].decode())
    assert channels == {"crm.seller.anna", f"crm.seller.{anna}"}
    subscriber.close()
    client.close()


def test_every_message_delivered_three_times_is_stored_once(loaded: LiveSystem) -> None:
    visits = [
        load_example("visits/visit-with-memo.json"),
        load_example("visits/visit-class-override-refused.json"),
    ]
    calls = load_example("calls/missed-from-switchboard.json")
    loaded.publish("visit", visits * 3)
    loaded.publish("call", calls * 3)
    for source_id in ("v-2026-11-24-anna-01", "v-2026-11-26-mikko-01", "c-2026-11-24-0042"):
        event_by_source_id(loaded, source_id)  # exactly one each
    missed = event_by_source_id(loaded, "c-2026-11-24-0042")
    assert missed["link_state"] == "ambiguous"
    refused = event_by_source_id(loaded, "v-2026-11-26-mikko-01")
    assert refused["class"] == "sales" and "refused" in refused["classification_note"]


def test_bad_messages_are_rejected_with_reasons_and_the_worker_lives(loaded: LiveSystem) -> None:
    bad = [
        {"schema": "crm.call/1", "source_system": "pbx", "status": "completed", "colour": "blue"},
        "not an object",
        {"schema": "crm.visit/1"},
    ]
    outcomes = loaded.publish("call", bad[:2]) + loaded.publish("visit", bad[2:])
    assert [d.outcome for d in outcomes] == ["rejected"] * 3
    result = loaded.cli("rejected", "--json")
    assert result.returncode == 0, result.stderr
    reasons = [r["reason"] for r in json.loads(result.stdout)]
    assert any("colour: Unknown field" in r and "call_id: Missing data" in r for r in reasons)
    assert any("must be a JSON object" in r for r in reasons)
    assert loaded.alive()


def test_emails_through_the_worker(loaded: LiveSystem) -> None:
    files = sorted((EXAMPLES / "emails").glob("*.eml"))
    result = loaded.cli("publish", "email", *map(str, files), "--wait", "60", "--json")
    assert result.returncode == 0, result.stderr
    outcomes = {r["source"].split("#")[0]: r["outcome"] for r in json.loads(result.stdout)}
    assert outcomes["auto-reply.eml"] == "rejected"
    assert {v for k, v in outcomes.items() if k != "auto-reply.eml"} == {"stored"}
    with loaded.sessions() as session:
        anna = staff_by_username(session, "anna")
        assert anna is not None
        for card in seller_cards(session, anna):
            assert card["count_week"] == sum(e["in_week"] for e in card["events"])
            assert card["count_month"] == sum(e["in_month"] for e in card["events"])
        assert session.scalar(select(func.count()).select_from(RefreshRequest)) in (0, 1)


def test_a_json_lines_backfill_through_batches(loaded: LiveSystem, tmp_path: Path) -> None:
    """`import messages`: any kind per line, parties first, one summary line, each message its
    outcome, the bad lines and messages told apart."""
    lines = [
        json.dumps(outbound_call("jl-1", "2026-10-05T09:00:00+03:00", agent="jl-maija")),
        "{not json",
        json.dumps({"schema": "crm.meeting/1"}),
        json.dumps(
            {
                "schema": "crm.party/1",
                "source_system": "erp",
                "kind": "staff",
                "username": "jl-maija",
                "name": "Maija Myyjä",
                "role": "seller",
            }
        ),
        json.dumps(
            {"schema": "crm.call/1", "source_system": "pbx", "call_id": "jl-bad", "colour": 1}
        ),
        "",
        json.dumps(outbound_call("jl-2", "2026-10-06T09:00:00+03:00", agent="jl-maija")),
        # JSON that no database keeps (NaN, a lone surrogate): in the batch of jl-2 and jl-3,
        # rejected alone.
        json.dumps(
            {**outbound_call("jl-nan", "2026-10-06T10:00:00+03:00"), "duration_s": float("nan")}
        ),
        json.dumps(outbound_call("jl-3", "2026-10-06T11:00:00+03:00", agent="jl-maija")),
        json.dumps({**outbound_call("jl-lone", "2026-10-06T12:00:00+03:00"), "note": "\ud800"}),
    ]
    path = tmp_path / "backfill.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = loaded.cli(
        "import", "messages", str(path), "--wait", "60", "--json", "--batch-size", "2"
    )
    assert result.returncode == 1, result.stderr  # two lines could not be imported
    report = json.loads(result.stdout)
    outcome = {r["source"]: (r["kind"], r["outcome"]) for r in report["published"]}
    assert outcome == {
        "backfill.jsonl:1": ("call", "stored"),
        "backfill.jsonl:4": ("party", "done"),
        "backfill.jsonl:5": ("call", "rejected"),
        "backfill.jsonl:7": ("call", "stored"),
        "backfill.jsonl:8": ("call", "rejected"),
        "backfill.jsonl:9": ("call", "stored"),
        "backfill.jsonl:10": ("call", "rejected"),
    }
    assert [e["line"] for e in report["errors"]] == [2, 3]
    assert "not a message of a known schema" in report["errors"][1]["error"]
    # The staff member came first, so both calls are hers.
    assert event_by_source_id(loaded, "jl-1")["seller"] == "jl-maija"
    assert event_by_source_id(loaded, "jl-2")["seller"] == "jl-maija"

    again = loaded.cli("import", "messages", str(path), "--wait", "60")
    assert again.returncode == 1, again.stderr
    summary = again.stdout.splitlines()[0]
    assert summary == (
        "7 message(s) published in 2 batch(es): done 1, duplicate 3, rejected 3; 2 not imported"
    )
    assert "backfill.jsonl:2: not imported: not JSON" in again.stderr


def test_a_document_before_its_call_is_kept_and_joins_it_when_replayed(
    loaded: LiveSystem,
) -> None:
    """Out of order: the signed offer arrives before the call it belongs to. It is rejected
    with the reason and kept; replayed once the call is stored, it joins the call."""
    from base64 import b64encode

    from models.documents import EventDocument
    from workers.publish import wait_for

    pdf = b"%PDF-1.4\n%\xc7\xec\x8f\xa2\ntrailer\n%%EOF\n"
    document = {
        "schema": "crm.document/1",
        "source_system": "erp",
        "event": {"kind": "call", "source_system": "pbx-hki", "id": "live-doc-1"},
        "documents": [{"filename": "offer.pdf", "content_b64": b64encode(pdf).decode()}],
    }
    [early] = loaded.publish("document", [document])
    assert early.outcome == "rejected"
    rejected = loaded.rejected(early.task_id)
    assert "no event for the call 'live-doc-1' of pbx-hki" in rejected.reason

    [call] = loaded.publish("call", [outbound_call("live-doc-1", "2026-11-24T09:00:00+02:00")])
    assert call.outcome == "stored"
    replayed = loaded.cli("replay", f"rejected:{rejected.id}", "--json")
    assert replayed.returncode == 0, replayed.stderr
    [entry] = json.loads(replayed.stdout)
    done = wait_for(loaded.sessions, [entry["task_id"]], 60)
    assert (done[entry["task_id"]].outcome, done[entry["task_id"]].event_id) == (
        "stored",
        call.event_id,
    )
    with loaded.sessions() as session:
        names = session.scalars(
            select(EventDocument.filename).where(EventDocument.event_id == call.event_id)
        ).all()
    assert names == ["offer.pdf"]
