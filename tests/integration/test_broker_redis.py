"""The Redis transport keeps a message a consumer took and never read
(workers/transport/broker_redis.py).

kombu's own transport pops a message with BRPOP: a worker killed after Redis sent the reply
and before it wrote the message to the unacked hash takes the only copy with it. Here the fetch
moves the message into the unacked hash in one step, so a consumer that vanishes right after
asking leaves it where the visibility timeout gives it back.
"""

from __future__ import annotations

import contextlib
import itertools
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Consumer, Exchange, Producer, Queue

from tests.processes import wait_until

pytestmark = pytest.mark.integration

TRANSPORT = "workers.transport.broker_redis:Transport"


@pytest.fixture
def queue(redis_database: str, redis_client: redis.Redis) -> Iterator[Queue]:
    name = f"tests.fetch.{uuid.uuid4().hex[:8]}"
    yield Queue(name, Exchange(name, type="direct"), routing_key=name)
    redis_client.delete(name)


def connection(url: str) -> Connection:
    return Connection(url, transport=TRANSPORT, transport_options={"visibility_timeout": 1})


def keep(received: list[Any], item: Any, message: Any) -> None:
    received.append(item)
    message.ack()


def test_a_message_fetched_by_a_consumer_that_vanished_comes_back(
    redis_database: str, redis_client: redis.Redis, queue: Queue
) -> None:
    body = {"call_id": f"fetch-{uuid.uuid4().hex[:6]}", "status": "completed"}
    with connection(redis_database) as publisher:
        Producer(publisher).publish(
            body, exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue]
        )
    assert redis_client.llen(queue.name) == 1

    # A consumer asks for the next message and is gone before it reads the answer.
    doomed = connection(redis_database)
    channel: Any = doomed.channel()
    Consumer(channel, queues=[queue], callbacks=[lambda *_: None]).consume()
    channel.connection.cycle._register_BRPOP(channel)  # sends the fetch, as the worker's loop
    wait_until(lambda: redis_client.llen(queue.name) == 0, "the fetch did not take the message")
    channel.client.connection.disconnect()

    # The message is held for it in the unacked hash, not lost with it ...
    unacked = redis_client.hgetall(channel.unacked_key)
    assert any(queue.name.encode() in value for value in unacked.values()), unacked
    # ... and once its visibility timeout has passed, any consumer restores and receives it.
    with connection(redis_database) as survivor:
        survivor_channel: Any = survivor.channel()
        received: list[Any] = []
        with Consumer(
            survivor_channel,
            queues=[queue],
            callbacks=[lambda payload, message: keep(received, message, message)],
        ):

            def restored_and_received() -> bool:
                survivor_channel.qos.restore_visible(num=100, interval=1)
                with contextlib.suppress(TimeoutError):
                    survivor.drain_events(timeout=0.2)
                return bool(received)

            wait_until(restored_and_received, "the message never came back")
    [message] = received
    assert message.payload == body
    assert message.delivery_info["redelivered"] is True
    assert redis_client.hlen(channel.unacked_key) == 0  # acknowledged: gone for good
    doomed.release()


def test_an_idle_consumer_receives_a_message_published_later(
    redis_database: str, queue: Queue
) -> None:
    """Without an event loop, an empty fetch is followed by a short wait on the server, then
    the next fetch."""
    with connection(redis_database) as consumer_connection:
        received: list[Any] = []
        with Consumer(
            consumer_connection,
            queues=[queue],
            callbacks=[lambda payload, message: keep(received, payload, message)],
        ):
            for _ in range(3):  # several empty fetches and waits
                with pytest.raises(TimeoutError):
                    consumer_connection.drain_events(timeout=0.3)
            with connection(redis_database) as publisher:
                Producer(publisher).publish(
                    {"n": 1}, exchange=queue.exchange, routing_key=queue.routing_key
                )

            def got_it() -> bool:
                with contextlib.suppress(TimeoutError):
                    consumer_connection.drain_events(timeout=0.5)
                return bool(received)

            wait_until(got_it, "the idle consumer never received the message")
    assert received == [{"n": 1}]


def test_on_the_worker_event_loop_an_idle_consumer_pauses_on_a_timer(
    redis_database: str, queue: Queue
) -> None:
    """On the worker's event loop (kombu's hub), the pause after an empty fetch is a timer that
    doubles from 1 ms to its cap, not a blocking command that Redis ends only at its ``hz``;
    a message published later is received and the pause starts again from the beginning."""
    from kombu.asynchronous import Hub

    from workers.transport.broker_redis import IDLE_WAIT_MAX_S, IDLE_WAIT_MIN_S

    with connection(redis_database) as consumer_connection:
        received: list[Any] = []
        hub = Hub()
        consumer_connection.transport.register_with_event_loop(consumer_connection.connection, hub)
        with Consumer(
            consumer_connection,
            queues=[queue],
            callbacks=[lambda payload, message: keep(received, payload, message)],
        ) as consumer:
            channel: Any = consumer.channel
            loop = hub.create_loop()
            pauses: list[float] = []
            server_waits = 0

            def turn() -> None:
                nonlocal server_waits
                next(loop)
                server_waits += channel._waiting
                if channel._resting and (not pauses or pauses[-1] != channel._idle_wait):
                    pauses.append(channel._idle_wait)

            deadline = time.monotonic() + 30
            while not pauses or pauses[-1] < IDLE_WAIT_MAX_S:
                assert time.monotonic() < deadline, f"the pauses never reached the cap: {pauses}"
                turn()
            with connection(redis_database) as publisher:
                Producer(publisher).publish(
                    {"n": 1}, exchange=queue.exchange, routing_key=queue.routing_key
                )
            while not received:
                assert time.monotonic() < deadline, "the idle consumer never received the message"
                turn()
            assert channel._idle_wait == 0.0  # the next pause starts from the beginning
        hub.close()
    assert received == [{"n": 1}]
    assert server_waits == 0
    assert pauses[0] == IDLE_WAIT_MIN_S
    assert all(b == min(2 * a, IDLE_WAIT_MAX_S) for a, b in itertools.pairwise(pauses))
