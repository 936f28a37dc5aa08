"""Generated envelopes through Redis to the session's worker: whatever the task id, the shape of
the arguments, the keyword arguments, the headers, the nesting and the size, every message ends
with an outcome, and a valid message is processed after them.

The messages are published as raw task messages of Celery's protocols 2 and 1, the way any
producer in any language could build them. Their one valid argument is a call from a number no
other test knows, so that whatever is stored touches no seller's tallies.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

import tests.fuzz.profiles  # noqa: F401  (registers and loads the Hypothesis profile)
from models.ledger import RejectedMessage
from tests.fuzz.profiles import PROFILE
from tests.integration.conftest import LiveSystem
from workers.publish import wait_for
from workers.transport.consumer import ledger_task_id

pytestmark = pytest.mark.integration

QUEUE = "crm.ingest.call"
EXAMPLES = 60

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def valid_call(status: str) -> dict[str, Any]:
    return {
        "schema": "crm.call/1",
        "source_system": "envelope-fuzz",
        "call_id": f"fuzz-{uuid.uuid4().hex[:12]}",
        "status": status,
        "direction": "inbound",
        "from": "+358 40 900 0072",
        "started_at": "2026-11-24T10:00:00+02:00",
    }


def nested(value: Any, depth: int) -> Any:
    for _ in range(depth):
        value = [value]
    return value


@st.composite
def envelopes(draw: Any) -> dict[str, Any]:
    """One raw task message: protocol, task id, arguments, keyword arguments, headers."""
    message = valid_call(draw(st.sampled_from(["ringing", "answered", "completed", "missed"])))
    depth = draw(st.sampled_from([0, 0, 0, 5, 31, 40, 200, 700]))
    if depth:
        message["extra"] = nested(1, depth)
    if draw(st.integers(0, 9)) == 0:
        message["note"] = "x" * draw(st.sampled_from([20_000, 300_000]))
    args = draw(
        st.one_of(
            st.just([message]),
            st.just([message, message]),
            st.just([]),
            st.lists(json_values, max_size=2).map(lambda extra: [message, *extra]),
            json_values,  # not a list at all
        )
    )
    kwargs = draw(
        st.one_of(
            st.just({}),
            st.dictionaries(
                st.sampled_from(["message", "bogus", "queue"]), json_values, max_size=2
            ),
            json_values,
        )
    )
    task_id = draw(
        st.one_of(
            st.uuids().map(str),
            st.uuids().map(str),
            st.text(min_size=1, max_size=300),
            st.integers(),
            st.lists(st.integers(), max_size=2),
        )
    )
    header_values = {
        "eta": st.one_of(
            st.none(),
            st.sampled_from(
                ["2026-11-24T10:00:00+00:00", "9999-12-31T00:00:00", "soon", "2026-13-40T00:00:00"]
            ),
            json_values,
        ),
        "expires": st.one_of(st.none(), st.sampled_from(["2000-01-01T00:00:00", "never"])),
        "timelimit": st.one_of(
            st.none(),
            st.tuples(
                st.one_of(st.none(), st.integers(-5, 10**6), st.floats(allow_nan=False)),
                st.one_of(st.none(), st.integers(-5, 10**6)),
            ).map(list),
            json_values,
        ),
        "retries": st.one_of(st.none(), st.integers(-3, 10**7), json_values),
        "argsrepr": st.one_of(st.none(), st.text(max_size=50), st.just("r" * 5000)),
        "root_id": st.one_of(st.none(), st.text(max_size=40), json_values),
        "shadow": st.one_of(st.none(), st.text(max_size=40)),
        "x-extra": st.one_of(json_values, st.just(nested({}, 100))),
    }
    headers = {
        name: draw(strategy) for name, strategy in header_values.items() if draw(st.booleans())
    }
    links = draw(st.sampled_from([None, None, [{"task": "crm.maintenance.reconcile"}]]))
    return {
        "protocol": draw(st.sampled_from([2, 2, 1])),
        "task_id": task_id,
        "args": args,
        "kwargs": kwargs,
        "headers": headers,
        "links": links,
    }


def publish(live: LiveSystem, envelope: dict[str, Any]) -> None:
    queue = live.app.amqp.queues[QUEUE]
    fields = dict(envelope["headers"])
    body: Any
    if envelope["protocol"] == 2:
        headers = {"lang": "py", "task": "crm.ingest.call", "id": envelope["task_id"], **fields}
        embed = {"callbacks": envelope["links"], "errbacks": None, "chain": None, "chord": None}
        body = [envelope["args"], envelope["kwargs"], embed]
    else:
        headers = {}
        body = {
            "task": "crm.ingest.call",
            "id": envelope["task_id"],
            "args": envelope["args"],
            "kwargs": envelope["kwargs"],
            "callbacks": envelope["links"],
            **fields,
        }
    with live.app.producer_or_acquire() as producer:
        producer.publish(
            json.dumps(body),
            exchange=queue.exchange,
            routing_key=queue.routing_key,
            headers=headers,
            content_type="application/json",
            content_encoding="utf-8",
            retry=True,
        )


def unkeyed_rejections(live: LiveSystem) -> int:
    with live.sessions() as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(RejectedMessage)
                .where(RejectedMessage.task_id.is_(None))
            )
            or 0
        )


def test_every_generated_envelope_ends_with_an_outcome(live: LiveSystem) -> None:
    generated: list[dict[str, Any]] = []

    @settings(
        max_examples=EXAMPLES,
        phases=[Phase.generate],
        database=None,
        derandomize=PROFILE == "ci",
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(envelopes())
    def collect(envelope: dict[str, Any]) -> None:
        generated.append(envelope)

    collect()
    before = unkeyed_rejections(live)
    keys: list[str] = []
    unkeyed = 0
    for envelope in generated:
        key = ledger_task_id(envelope["task_id"])
        if key is None:
            unkeyed += 1
        elif key not in keys:  # two envelopes may share a generated id: one outcome each key
            keys.append(key)
        publish(live, envelope)
    done = wait_for(live.sessions, keys, 180)
    missing = [key for key in keys if key not in done]
    assert not missing, f"{len(missing)} envelope(s) without an outcome; worker:\n{live.tail()}"
    assert unkeyed_rejections(live) - before >= unkeyed
    failed = [d for d in done.values() if d.outcome == "failed"]
    assert not failed, [(d.task_id, d.detail) for d in failed]
    # The worker is alive and processes a valid message after all of them.
    [after] = live.publish("call", [valid_call("completed")], timeout=60)
    assert after.outcome == "stored", after.detail
    assert live.alive(), live.tail()
