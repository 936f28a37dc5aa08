"""A call task takes the plain call messages queued behind it (workers/transport/drain.py), on a
real Redis, with the worker's own transport: what it takes sits in the unacked hash until it is
acknowledged or put back, and whatever it does not take stays in the queue as it was."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import kombu.pools
import pytest
import redis
from kombu import Exchange, Queue
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

from config.queues import CALL_TASK, RECORDING_TASK
from config.settings import ConfigError, Settings, load_settings
from workers.base import soft_time_limit
from workers.transport.broker_redis import RAW_MARK
from workers.transport.drain import (
    RECORD_PREFIX,
    Drained,
    drain,
    drains,
    restore_drained_of,
)
from workers.transport.envelope import Limits


@pytest.fixture(scope="module")
def app(settings: Settings) -> Iterator[Any]:
    from workers.app import create_app

    app = create_app(settings)
    yield app
    # Its connections are in kombu's registry, shared by every app of the same broker URL:
    # closed and forgotten there, so that an app made later in the session gets fresh ones.
    kombu.pools.reset()


@pytest.fixture
def queue(redis_client: redis.Redis) -> Iterator[str]:
    name = f"test.drain.{uuid.uuid4().hex[:8]}"
    yield name
    redis_client.delete(name)


@pytest.fixture
def limits(settings: Settings) -> Limits:
    return Limits.of(settings, soft_time_limit(settings.task_time_limit_s), 40 * 1024 * 1024)


def call(n: int) -> dict[str, Any]:
    return {"schema": "crm.call/1", "source_system": "pbx", "call_id": f"c{n}", "status": "missed"}


def publish(app: Any, queue: str, task: str = CALL_TASK, **options: Any) -> str:
    """Publish as any producer would, to a queue of the test's own (no worker consumes it)."""
    task_id = options.pop("task_id", None) or str(uuid.uuid4())
    args = options.pop("args", None) or [call(len(task_id))]
    app.send_task(
        task, args=args, queue=Queue(queue, Exchange(queue), queue), task_id=task_id, **options
    )
    return task_id


def queued(client: redis.Redis, queue: str) -> list[dict[str, Any]]:
    """The queue's messages in the order the worker takes them (it pops from the right)."""
    return [loads(item) for item in reversed(client.lrange(queue, 0, -1))]


def recorded(client: redis.Redis, task_id: str) -> list[str]:
    """The tags listed under a task's id."""
    return [bytes_to_str(t) for t in client.lrange(RECORD_PREFIX + task_id, 0, -1)]


def unacked(client: redis.Redis, tags: list[str]) -> list[Any]:
    return [client.hget("unacked", tag) for tag in tags]


@pytest.mark.parametrize("bad", ["-1", "1001", "many"])
def test_the_drain_size_is_0_to_1000(bad: str) -> None:
    assert load_settings({"CRM_CALL_DRAIN": "0"}).call_drain == 0
    assert load_settings({}).call_drain == 100
    assert load_settings({}).email_drain == 50
    for name in ("CRM_CALL_DRAIN", "CRM_EMAIL_DRAIN"):
        with pytest.raises(ConfigError, match=name):
            load_settings({name: bad})


def test_calls_are_drained_with_the_redis_broker_only(settings: Settings) -> None:
    assert drains(settings, settings.call_drain)
    assert drains(settings, settings.email_drain)
    assert not drains(settings, 0)
    assert not drains(Settings.embedded(settings.data_dir), 100)


def test_a_drain_takes_plain_calls_in_order_up_to_its_limit(
    app: Any, queue: str, redis_client: redis.Redis, limits: Limits
) -> None:
    ids = [publish(app, queue, args=[call(n)]) for n in range(5)]
    drained = drain(app, queue, CALL_TASK, "the-task", 3, limits)
    assert drained is not None
    assert drained.task_ids == ids[:3]
    assert [m["call_id"] for m in drained.messages] == ["c0", "c1", "c2"]
    # Held in the unacked hash in the fetch script's form, listed under the task's id.
    held = unacked(redis_client, drained.tags)
    assert all(isinstance(entry, bytes) and entry.startswith(RAW_MARK.encode()) for entry in held)
    assert recorded(redis_client, "the-task") == drained.tags
    assert [m["headers"]["id"] for m in queued(redis_client, queue)] == ids[3:]
    drained.ack()
    assert unacked(redis_client, drained.tags) == [None] * 3
    assert not redis_client.zscore("unacked_index", drained.tags[0])
    assert not redis_client.exists(RECORD_PREFIX + "the-task")


def test_a_drain_takes_at_most_drain_bytes_and_leaves_the_rest_in_order(
    app: Any, queue: str, redis_client: redis.Redis, limits: Limits
) -> None:
    # Three calls of 3.3 MiB each as the broker holds them (a long note, base64-encoded): two
    # fit in DRAIN_BYTES (8 MiB), the third waits for the next task.
    big = [{**call(n), "note": "x" * (5 * 512 * 1024)} for n in range(3)]
    ids = [publish(app, queue, args=[message]) for message in big]
    drained = drain(app, queue, CALL_TASK, "big-task", 10, limits)
    assert drained is not None and drained.task_ids == ids[:2]
    assert [m["headers"]["id"] for m in queued(redis_client, queue)] == ids[2:]
    drained.ack()


@pytest.mark.parametrize(
    "other",
    [
        {"task": RECORDING_TASK},
        {"countdown": 60},
        {"expires": 600},
        {"headers": {"redelivered": True}},
        {"duplicate id": True},
        {"args": 2},
        {"compression": "zlib"},
    ],
    ids=[
        "another task",
        "an eta",
        "an expiry",
        "a redelivery",
        "a task id again",
        "two args",
        "compressed",
    ],
)
def test_a_drain_stops_at_the_first_message_that_is_not_a_plain_call_and_leaves_it_in_place(
    app: Any, queue: str, redis_client: redis.Redis, limits: Limits, other: dict[str, Any]
) -> None:
    first = publish(app, queue)
    if other.get("task"):
        odd = publish(app, queue, task=other["task"])
    elif other.get("duplicate id"):
        odd = publish(app, queue, task_id=first)
    elif other.get("args"):
        odd = publish(app, queue, args=[call(1), call(2)])
    else:
        odd = publish(app, queue, **other)
    last = publish(app, queue)
    before = queued(redis_client, queue)[1:]
    drained = drain(app, queue, CALL_TASK, "a-task", 10, limits)
    assert drained is not None and drained.task_ids == [first]
    # The rest is back as it was, in its order, at the front: the consumer takes it next.
    after = queued(redis_client, queue)
    assert after == before
    assert [m["headers"]["id"] for m in after] == [odd, last]
    assert recorded(redis_client, "a-task") == drained.tags
    assert redis_client.hlen("unacked") >= 1
    drained.ack()


def test_a_message_that_is_not_kombus_is_left_for_the_consumer_to_refuse(
    app: Any, queue: str, redis_client: redis.Redis, limits: Limits
) -> None:
    redis_client.lpush(queue, b'{"body": "not base64 \xff", "headers": ')
    assert drain(app, queue, CALL_TASK, "b-task", 10, limits) is None
    assert redis_client.lrange(queue, 0, -1) == [b'{"body": "not base64 \xff", "headers": ']
    assert not redis_client.exists(RECORD_PREFIX + "b-task")


def drained_all(app: Any, queue: str, task_id: str, count: int, limits: Limits) -> Drained:
    """Publish ``count`` calls and drain them all under ``task_id``."""
    ids = [publish(app, queue) for _ in range(count)]
    drained = drain(app, queue, CALL_TASK, task_id, 10, limits)
    assert drained is not None and drained.task_ids == ids
    return drained


def test_put_back_marks_them_redelivered_so_each_then_runs_alone(
    app: Any, queue: str, redis_client: redis.Redis, limits: Limits
) -> None:
    drained = drained_all(app, queue, "c-task", 3, limits)
    ids = drained.task_ids
    drained.put_back()
    back = queued(redis_client, queue)
    assert sorted(m["headers"]["id"] for m in back) == sorted(ids)
    assert all(m["headers"]["redelivered"] for m in back)
    assert unacked(redis_client, drained.tags) == [None] * 3
    # A redelivered message is never drained: the consumer gives it to a task of its own.
    assert drain(app, queue, CALL_TASK, "d-task", 10, limits) is None
    assert len(queued(redis_client, queue)) == 3


def test_a_task_run_again_puts_back_what_its_killed_run_had_drained(
    app: Any, queue: str, redis_client: redis.Redis, limits: Limits
) -> None:
    ids = drained_all(app, queue, "e-task", 2, limits).task_ids
    assert queued(redis_client, queue) == []
    # Its process died here; Celery requeues the task, which, run again, puts them back.
    assert restore_drained_of(app, CALL_TASK, "e-task") == 2
    back = queued(redis_client, queue)
    assert sorted(m["headers"]["id"] for m in back) == sorted(ids)
    assert all(m["properties"]["delivery_info"]["redelivered"] for m in back)
    assert not redis_client.exists(RECORD_PREFIX + "e-task")
    assert restore_drained_of(app, CALL_TASK, "e-task") == 0  # once only
