"""Messages the worker refuses are recorded and never deserialised; the worker keeps consuming.

Each message is published to the session worker's queue exactly as a foreign or broken
producer would: a pickle (with a payload that would create a directory if it were ever
unpickled), a YAML or untyped body, JSON that does not parse, a JSON body that is no task
message, a task this worker does not have.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pickle
import uuid
import zlib
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from tests.conftest import load_example
from tests.integration.conftest import LiveSystem
from workers.publish import wait_for
from workers.transport.compression import decompressed_limit
from workers.transport.consumer import BODY_KEEP_BYTES

pytestmark = pytest.mark.integration

QUEUE = "crm.ingest.call"


class CreatesDirectoryWhenUnpickled:
    """Unpickling this calls os.mkdir(marker): proof that a body was deserialised."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (str(self.marker),))


def publish_raw(
    live: LiveSystem,
    body: bytes,
    content_type: str | None,
    *,
    task: str | None = "crm.ingest.call",
    content_encoding: str = "utf-8",
    **extra_headers: str,
) -> str:
    """Publish a message with Celery's protocol-2 headers and the given body, untouched."""
    task_id = str(uuid.uuid4())
    headers: dict[str, Any] = {"id": task_id, "lang": "py", "root_id": task_id, **extra_headers}
    if task is not None:
        headers["task"] = task
    queue = live.app.amqp.queues[QUEUE]
    with live.app.producer_or_acquire() as producer:
        producer.publish(
            body,
            exchange=queue.exchange,
            routing_key=queue.routing_key,
            declare=[queue],
            headers=headers,
            content_type=content_type,
            content_encoding=content_encoding,
            retry=True,
        )
    return task_id


def first_call() -> dict[str, Any]:
    loaded = load_example("calls/inbound-answered.json")
    message: dict[str, Any] = loaded[0] if isinstance(loaded, list) else loaded
    return message


def still_consuming(live: LiveSystem) -> None:
    message = {**first_call(), "call_id": f"sec-{uuid.uuid4().hex[:8]}"}
    (delivery,) = live.publish("call", [message], timeout=60)
    assert delivery.outcome in {"stored", "duplicate"}, delivery.detail
    assert live.alive()


def test_pickle_is_refused_recorded_and_never_unpickled(live: LiveSystem, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    message = first_call()
    # A producer that speaks pickle, as a misconfigured or hostile client would.
    pickler = Celery("pickler", broker=live.settings.broker_url, set_as_current=False)
    pickler.conf.update(task_serializer="pickle", accept_content=["pickle", "json"])
    task_id = str(uuid.uuid4())
    pickler.send_task(
        "crm.ingest.call",
        args=[message, CreatesDirectoryWhenUnpickled(marker)],
        task_id=task_id,
        queue=QUEUE,
        serializer="pickle",
    )
    pickler.close()
    row = live.rejected(task_id)
    assert row.task_name == "crm.ingest.call"
    assert "application/x-python-serialize" in row.reason and "pickle" in row.reason
    assert "not deserialised" in row.reason
    payload = row.payload
    body = base64.b64decode(payload["body_b64"])
    assert payload["body_size"] == len(body) and not payload["body_truncated"]
    assert payload["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert payload["routing_key"] == QUEUE
    assert b"posix" in body or b"os" in body  # the pickle itself is kept, byte for byte
    # A body is decoded, if at all, before its record is written: the marker would be there.
    assert not marker.exists(), "the pickle was deserialised"
    still_consuming(live)
    assert not marker.exists()
    # Not a message that can be sent again: replay says so instead of publishing it.
    replay = live.cli("replay", f"rejected:{row.id}")
    assert replay.returncode == 1
    assert "refused undecoded" in replay.stderr


def test_raw_pickle_without_task_header_is_recorded(live: LiveSystem, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled-v1"
    body = pickle.dumps(
        {"task": "crm.ingest.call", "args": [CreatesDirectoryWhenUnpickled(marker)]}
    )
    task_id = publish_raw(live, body, "application/x-python-serialize", task=None)
    row = live.rejected(task_id)
    assert row.task_name == "(unknown)"
    assert "pickle" in row.reason
    assert base64.b64decode(row.payload["body_b64"]) == body
    assert not marker.exists()
    still_consuming(live)


@pytest.mark.parametrize(
    ("content_type", "named"),
    [
        ("application/x-yaml", "YAML"),
        ("application/data", "application/data"),
        ("text/plain", "text/plain"),
    ],
)
def test_other_content_types_are_refused_and_recorded(
    live: LiveSystem, content_type: str | None, named: str
) -> None:
    body = json.dumps([[{"schema": "crm.call/1"}], {}, {}]).encode()
    task_id = publish_raw(live, body, content_type)
    row = live.rejected(task_id)
    assert named in row.reason and "only application/json is accepted" in row.reason
    assert base64.b64decode(row.payload["body_b64"]) == body


def test_json_that_does_not_parse_is_recorded(live: LiveSystem) -> None:
    body = b'[[{"schema": "crm.call/1", "call_id": ' + b"\xff" * 10
    task_id = publish_raw(live, body, "application/json")
    row = live.rejected(task_id)
    assert "could not be decoded as application/json" in row.reason
    assert base64.b64decode(row.payload["body_b64"]) == body
    still_consuming(live)


def test_a_body_that_does_not_decompress_is_recorded(live: LiveSystem) -> None:
    body = b"this is not gzip"
    task_id = publish_raw(live, body, "application/json", compression="application/x-gzip")
    row = live.rejected(task_id)
    assert "could not be decoded" in row.reason, row.reason
    assert base64.b64decode(row.payload["body_b64"]) == body
    still_consuming(live)


def test_a_compression_bomb_is_recorded_not_expanded(live: LiveSystem) -> None:
    limit = decompressed_limit(live.settings)
    body = zlib.compress(b"[" + b" " * (limit + 1024), 9)
    task_id = publish_raw(live, body, "application/json", compression="application/x-gzip")
    row = live.rejected(task_id)
    assert f"expands to more than {limit} bytes" in row.reason, row.reason
    assert row.payload["body_size"] == len(body)
    still_consuming(live)


def test_a_compressed_message_within_bounds_is_processed(live: LiveSystem) -> None:
    message = {**first_call(), "call_id": f"gz-{uuid.uuid4().hex[:8]}"}
    task_id = str(uuid.uuid4())
    live.app.send_task(
        "crm.ingest.call", args=[message], task_id=task_id, queue=QUEUE, compression="gzip"
    )
    done = wait_for(live.sessions, [task_id], 60)
    assert done[task_id].outcome == "stored", done[task_id].detail


def test_json_that_is_no_task_message_is_recorded(live: LiveSystem) -> None:
    task_id = publish_raw(live, b'{"hello": "world"}', "application/json")
    row = live.rejected(task_id)
    assert row.reason.startswith(("not a task message", "not a valid task message")), row.reason
    still_consuming(live)


def test_unknown_task_is_recorded(live: LiveSystem) -> None:
    body = json.dumps([[{"schema": "crm.fax/1"}], {}, {}]).encode()
    task_id = publish_raw(live, body, "application/json", task="crm.ingest.fax")
    row = live.rejected(task_id)
    assert row.task_name == "crm.ingest.fax"
    assert "no such task 'crm.ingest.fax'" in row.reason


def test_a_large_refused_body_keeps_its_head_size_and_hash(live: LiveSystem) -> None:
    body = os.urandom(BODY_KEEP_BYTES * 3)
    task_id = publish_raw(live, body, "application/octet-stream", content_encoding="binary")
    row = live.rejected(task_id)
    payload = row.payload
    assert payload["body_truncated"] is True
    assert payload["body_size"] == len(body)
    assert payload["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert base64.b64decode(payload["body_b64"]) == body[:BODY_KEEP_BYTES]
