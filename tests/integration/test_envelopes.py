"""Whatever arrives at a crm queue ends as an event, a rejection or a failure with a reason,
and no message takes a pool process or a delivery slot with it (workers/transport/envelope.py).

Each message goes through Redis to the session's worker exactly as an odd or hostile producer
would send it: arguments nested hundreds of levels deep, a task id longer than the ledger keys,
arguments that do not fit the task, links to other tasks, an ``eta`` past the visibility
window, an ``expires`` long gone, Celery's protocol 1. After each, a valid message is processed.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from celery import Celery

from tests.integration.conftest import LiveSystem
from tests.messages import unlinked_call
from workers.publish import wait_for
from workers.transport.consumer import ledger_task_id
from workers.transport.envelope import MAX_DEPTH, MAX_TASK_ID

pytestmark = pytest.mark.integration

QUEUE = "crm.ingest.call"
TASK = "crm.ingest.call"


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def send(live: LiveSystem, args: list[Any], task_id: str | None = None, **options: Any) -> str:
    task_id = task_id or str(uuid.uuid4())
    live.app.send_task(TASK, args=args, task_id=task_id, queue=QUEUE, **options)
    return task_id


def outcome(live: LiveSystem, task_id: str) -> Any:
    key = ledger_task_id(task_id)
    assert key is not None
    done = wait_for(live.sessions, [key], 60)
    assert key in done, f"no outcome for {task_id!r}; worker log:\n{live.tail()}"
    return done[key]


def still_processing(live: LiveSystem) -> None:
    (delivery,) = live.publish("call", [unlinked_call("after")], timeout=60)
    assert delivery.outcome == "stored", delivery.detail
    assert live.alive(), live.tail()


def test_deeply_nested_arguments_are_refused_without_taking_the_pool(live: LiveSystem) -> None:
    # Two such messages used to take both pool slots of the worker for good.
    ids = [send(live, [{**unlinked_call("deep"), "extra": nested(600)}]) for _ in range(3)]
    for task_id in ids:
        row = live.rejected(task_id)
        assert f"nested deeper than {MAX_DEPTH} levels" in row.reason
        assert row.payload["body_size"] > 1200  # described, not decoded into the row
    still_processing(live)


def test_nesting_in_the_headers_is_refused_too(live: LiveSystem) -> None:
    task_id = send(live, [unlinked_call("env")], headers={"x-deep": nested(600)})
    assert "headers is nested deeper" in live.rejected(task_id).reason
    still_processing(live)


def test_a_task_id_longer_than_the_ledger_keys_is_recorded_and_replayable(
    live: LiveSystem,
) -> None:
    message = unlinked_call("long-id")
    task_id = send(live, [message], task_id="L" * 150)
    row = live.rejected(ledger_task_id(task_id) or "")
    assert row.reason == (f"the task id is 150 characters long; at most {MAX_TASK_ID} are accepted")
    assert row.payload == message  # the message itself: a replay can send it again
    replayed = live.cli("replay", f"rejected:{row.id}", "--json")
    assert replayed.returncode == 0, replayed.stderr
    [entry] = json.loads(replayed.stdout)
    done = wait_for(live.sessions, [entry["task_id"]], 60)
    assert done[entry["task_id"]].outcome == "stored", done[entry["task_id"]].detail


@pytest.mark.parametrize(
    ("args", "kwargs", "said"),
    [
        ("two", {}, "too many positional arguments"),
        ("none", {}, "missing a required argument: 'message'"),
        ("one", {"bogus": 1}, "got an unexpected keyword argument 'bogus'"),
    ],
)
def test_arguments_that_do_not_fit_the_task_are_refused(
    live: LiveSystem, args: str, kwargs: dict[str, Any], said: str
) -> None:
    message = unlinked_call("env")
    positional = {"two": [message, message], "none": [], "one": [message]}[args]
    task_id = send(live, positional, kwargs=kwargs)
    row = live.rejected(task_id)
    assert row.reason.startswith(f"the arguments do not fit {TASK}(message): {said}"), row.reason
    still_processing(live)


def test_links_to_other_tasks_are_refused(live: LiveSystem) -> None:
    link = live.app.signature("crm.maintenance.reconcile")
    task_id = send(live, [unlinked_call("env")], link=link, link_error=link)
    row = live.rejected(task_id)
    assert "links to other tasks (callbacks, errbacks) are not accepted" in row.reason
    still_processing(live)


def test_an_eta_past_the_visibility_window_is_refused(live: LiveSystem) -> None:
    settings = live.settings
    ahead = settings.visibility_timeout_s - settings.task_time_limit_s + 600
    task_id = send(live, [unlinked_call("env")], countdown=ahead)
    row = live.rejected(task_id)
    assert "'eta'" in row.reason and "CRM_VISIBILITY_TIMEOUT_S" in row.reason
    # Refused for its envelope alone: the message is kept whole and can be replayed.
    assert row.payload["schema"] == "crm.call/1"


def test_an_expired_message_is_still_processed_not_dropped(live: LiveSystem) -> None:
    # Celery drops a message whose expiry has passed without a trace; here it is processed.
    task_id = send(live, [unlinked_call("env")], expires=-60)
    assert outcome(live, task_id).outcome == "stored"


def test_a_protocol_1_message_is_processed(live: LiveSystem) -> None:
    """Celery's protocol 1 (gocelery, old clients): everything in the body."""
    sender = Celery("proto1", broker=live.settings.broker_url, set_as_current=False)
    sender.conf.update(task_protocol=1, task_serializer="json")
    good, deep = str(uuid.uuid4()), str(uuid.uuid4())
    try:
        sender.send_task(TASK, args=[unlinked_call("proto1")], task_id=good, queue=QUEUE)
        sender.send_task(
            TASK,
            args=[{**unlinked_call("proto1"), "extra": nested(600)}],
            task_id=deep,
            queue=QUEUE,
        )
    finally:
        sender.close()
    assert outcome(live, good).outcome == "stored"
    assert "nested deeper" in live.rejected(deep).reason
    still_processing(live)


def test_a_large_rejected_message_is_kept_by_reference_and_replayed_whole(
    live: LiveSystem,
) -> None:
    # An email of 1.5 MB with a field no version of the format has: bad input. Its row keeps
    # a prefix, the size and the SHA-256; the message itself goes to the document store.
    message = {
        "schema": "crm.email/1",
        "source_system": "gateway-test",
        "raw_b64": "TWFpbCBib2R5IA==" * 100_000,
        "mail_from": "someone@example.com",
        "rcpt_to": ["crm@myyntitalo.fi"],
        "received_at": "2026-11-24T10:00:00+02:00",
        "unheard_of": True,
    }
    task_id = str(uuid.uuid4())
    live.app.send_task(
        "crm.ingest.email", args=[message], task_id=task_id, queue="crm.ingest.email"
    )
    row = live.rejected(task_id)
    assert "unheard_of" in row.reason
    assert set(row.payload) == {"payload_sha256", "payload_size", "payload_prefix"}
    assert row.payload["payload_size"] > 1_500_000
    assert len(json.dumps(row.payload)) < 200_000
    replayed = live.cli("replay", f"rejected:{row.id}", "--json")
    assert replayed.returncode == 0, replayed.stderr
    [entry] = json.loads(replayed.stdout)
    again = live.rejected(entry["task_id"])
    assert again.payload["payload_sha256"] == row.payload["payload_sha256"]  # the same message
