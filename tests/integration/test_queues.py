"""Each queue is bound to a direct exchange of its own name, with its own name as the routing key
(docs/messages.md): what the worker banner, Flower and ``inspect active_queues`` show, and what a
producer that is not Celery publishes to.
"""

from __future__ import annotations

import json
import uuid

import pytest
from kombu import Exchange, Producer

from config.queues import QUEUES
from tests.integration.conftest import LiveSystem
from tests.messages import unlinked_call
from workers.publish import wait_for

pytestmark = pytest.mark.integration


def test_the_worker_reports_each_queue_on_an_exchange_of_its_own_name(live: LiveSystem) -> None:
    replies = None
    for _ in range(10):  # a broadcast answered by nobody yet (the worker busy) is asked again
        replies = live.app.control.inspect(timeout=5).active_queues()
        if replies:
            break
    assert replies, f"the worker did not answer; its log:\n{live.tail()}"
    (queues,) = replies.values()
    bound = {
        q["name"]: (q["exchange"]["name"], q["exchange"]["type"], q["routing_key"]) for q in queues
    }
    assert bound == {name: (name, "direct", name) for name in QUEUES}


def test_a_producer_publishing_to_the_documented_exchange_reaches_the_worker(
    live: LiveSystem,
) -> None:
    """A producer in another language publishes to exchange and routing key ``crm.ingest.call``
    and declares nothing: the worker's own bindings route it."""
    task_id = str(uuid.uuid4())
    body = json.dumps([[unlinked_call("exchange")], {}, {"callbacks": None, "errbacks": None}])
    headers = {
        "lang": "go",
        "task": "crm.ingest.call",
        "id": task_id,
        "root_id": task_id,
        "parent_id": None,
        "group": None,
        "retries": 0,
        "eta": None,
        "expires": None,
    }
    with live.app.connection_for_write() as connection:
        Producer(connection.default_channel).publish(
            body,
            exchange=Exchange("crm.ingest.call", type="direct"),
            routing_key="crm.ingest.call",
            headers=headers,
            content_type="application/json",
            content_encoding="utf-8",
            serializer=None,
            declare=[],
        )
    done = wait_for(live.sessions, [task_id], 60)
    assert task_id in done, f"no outcome; worker log:\n{live.tail()}"
    assert done[task_id].outcome == "stored", done[task_id].detail
