"""A call or email task takes the messages of its kind queued behind it: one transaction for a
burst.

A call message costs a pool process a transaction of a dozen statements, an email more; the
batch stage stores new calls and new emails with a few statements for all of them
(``tasks.ingest.call_batch``, ``tasks.ingest.email_batch``). When they come in a burst (a
contact centre's busy minute, a PBX or a mailbox catching up after an outage) they wait on
their queue while both pool processes are busy. A ``crm.ingest.call`` task then takes up to
``CRM_CALL_DRAIN`` call messages queued behind it, a ``crm.ingest.email`` task up to
``CRM_EMAIL_DRAIN`` emails (of :data:`DRAIN_BYTES` in all at most), and stores them with its own
message as one batch, each with its own delivery row under its own task id: stored, duplicate,
rejected (a bad one is rejected alone) or failed, as if each had run alone.

Nothing about delivery changes:

- The worker still reserves one message per pool process (prefetch 1); a drain takes only what
  is queued at that moment, so a message arriving alone is stored alone, without waiting.
- One Lua script moves the messages from the queue into the broker's unacked hash, in the form
  the worker's own fetch writes (``workers.transport.broker_redis.FETCH_SCRIPT``), and lists
  their tags under the task's id: whatever dies after it, every message is where the visibility
  timeout restores it, marked redelivered.
- They are acknowledged only after the batch's commit. A batch that does not commit (a lost
  database, the time limit, a bug) puts them back in their queue marked redelivered, so each then
  runs alone. A task whose pool process was killed is put back at the end of its queue by
  Celery at once; when it runs again (redelivered), it first puts back what it had drained, at
  the front, also marked redelivered: a message that kills its process is counted toward
  ``CRM_MAX_DELIVERIES`` like any other.
- Only plain messages of the task's own kind are taken: the first message of the queue that is
  anything else (a recording fetch or a document, which share the queues, a redelivery, an
  ``eta`` or ``expires``, a compressed body, a message that does not pass the consumer's
  envelope check, a duplicate task id) ends the drain and goes back to the front of the queue
  with the ones after it, in their order, for the consumer to handle as always. No drain with
  signed messages, the embedded broker or a key prefix.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from time import time
from typing import Any

from kombu import Connection
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

from config.settings import Settings
from workers.transport.broker_redis import RAW_MARK, Channel
from workers.transport.envelope import Limits, Refused, admit

log = logging.getLogger(__name__)

#: Moves up to ARGV[1] messages, of ARGV[6] bytes in all at most, from the queue (KEYS[3]) into
#: the unacked hash (KEYS[1]) and its index (KEYS[2]), each under the tag ARGV[4] .. n, scored
#: ARGV[2], as the fetch script writes them (ARGV[3] is its mark); lists the tags in KEYS[4]
#: (kept ARGV[5] seconds); returns {tag, message, tag, message, ...}.
DRAIN_SCRIPT = """
local taken = {}
local size = 0
for n = 1, tonumber(ARGV[1]) do
  local item = redis.call('LINDEX', KEYS[3], -1)
  if not item then break end
  size = size + string.len(item)
  if size > tonumber(ARGV[6]) then break end
  redis.call('RPOP', KEYS[3])
  local tag = ARGV[4] .. n
  redis.call('ZADD', KEYS[2], ARGV[2], tag)
  redis.call('HSET', KEYS[1], tag, ARGV[3] .. KEYS[3] .. '\\n' .. item)
  redis.call('RPUSH', KEYS[4], tag)
  taken[#taken + 1] = tag
  taken[#taken + 1] = item
end
if #taken > 0 then redis.call('EXPIRE', KEYS[4], ARGV[5]) end
return taken
"""
#: Puts drained messages back at the front of their queue (KEYS[3]) as they were taken, the
#: last first (ARGV: tag, message, tag, message ...), each only while the unacked hash (KEYS[1])
#: still holds it; forgets their tags (index KEYS[2], list KEYS[4]).
UNTAKE_SCRIPT = """
for n = 1, #ARGV, 2 do
  if redis.call('HDEL', KEYS[1], ARGV[n]) == 1 then
    redis.call('RPUSH', KEYS[3], ARGV[n + 1])
  end
  redis.call('ZREM', KEYS[2], ARGV[n])
  redis.call('LREM', KEYS[4], 0, ARGV[n])
end
return 1
"""
#: Acknowledges drained messages: forgets their unacked entries, their index and their list.
ACK_SCRIPT = """
for n = 1, #ARGV do
  redis.call('HDEL', KEYS[1], ARGV[n])
  redis.call('ZREM', KEYS[2], ARGV[n])
end
redis.call('DEL', KEYS[3])
return 1
"""

#: The key listing the tags of what a task drained.
RECORD_PREFIX = "crm.drained."
#: The most bytes of messages one task takes (as the broker holds them): fifty typical emails
#: inline, or a few large ones; what is over it waits for the next task.
DRAIN_BYTES = 8 * 1024 * 1024

_connections: dict[int, Connection] = {}


@contextmanager
def _discarding() -> Iterator[None]:
    """A broker operation: on failure, the connection is dropped and the error raised."""
    try:
        yield
    except Exception:
        _discard()
        raise


def _channel(app: Any) -> Channel | None:
    """This process's channel to the broker, when it is the worker's Redis transport."""
    connection = _connections.get(os.getpid())
    if connection is None:
        connection = _connections[os.getpid()] = app.connection_for_write()
    try:
        channel = connection.default_channel
    except Exception:
        _discard()
        raise
    if not isinstance(channel, Channel) or channel.global_keyprefix:
        return None
    return channel


def _discard() -> None:
    """Forget this process's connection (it failed): the next drain connects again."""
    connection = _connections.pop(os.getpid(), None)
    if connection is not None:
        try:
            connection.release()
        except Exception:
            log.debug("closing a failed broker connection", exc_info=True)


def drains(settings: Settings, limit: int) -> bool:
    """Whether a task takes up to ``limit`` messages queued behind it with these settings."""
    return (
        limit > 0
        and not settings.embedded_broker
        and not settings.signing_enabled
        and settings.effective_broker_url.startswith("redis://")
    )


@dataclass
class Drained:
    """The messages a task took from its queue: their tags, task ids and messages."""

    channel: Channel
    queue_key: str
    record_key: str
    tags: list[str] = field(default_factory=list)
    task_ids: list[str] = field(default_factory=list)
    messages: list[Any] = field(default_factory=list)

    def ack(self) -> None:
        """After the commit: they are done."""
        with _discarding():
            self.channel.client.eval(
                ACK_SCRIPT,
                3,
                self.channel.unacked_key,
                self.channel.unacked_index_key,
                self.record_key,
                *self.tags,
            )

    def put_back(self) -> None:
        """The batch did not commit: back in their queue, marked redelivered (each runs alone).
        Should the broker be unreachable, the visibility timeout puts them back."""
        try:
            with _discarding():
                restore(self.channel, self.record_key)
        except Exception as exc:
            log.warning("drained messages left to the visibility timeout: %r", exc)


def drain(
    app: Any, queue: str, task_name: str, task_id: str, limit: int, limits: Limits
) -> Drained | None:
    """Take up to ``limit`` plain ``task_name`` messages queued on ``queue`` (at most
    :data:`DRAIN_BYTES`); None when there are none."""
    channel = _channel(app)
    if channel is None:
        return None
    queue_key = channel._q_for_pri(queue, 0)
    record_key = RECORD_PREFIX + task_id
    prefix = f"{RAW_MARK}{uuid.uuid4()}-"
    with _discarding():
        reply = _take(channel, queue_key, record_key, limit, prefix, app)
    if not reply:
        return None
    # The messages as Redis holds them: one put back must be the same bytes.
    taken: list[tuple[str, bytes]] = [
        (bytes_to_str(reply[n]), reply[n + 1]) for n in range(0, len(reply), 2)
    ]
    drained = Drained(channel, queue_key, record_key)
    seen = {task_id}
    for position, (tag, item) in enumerate(taken):
        plain = _plain(channel, app, item, task_name, limits)
        if plain is None or plain[0] in seen:
            with _discarding():
                _untake(channel, queue_key, record_key, taken[position:])
            break
        seen.add(plain[0])
        drained.tags.append(tag)
        drained.task_ids.append(plain[0])
        drained.messages.append(plain[1])
    return drained if drained.tags else None


def _take(
    channel: Channel, queue_key: str, record_key: str, limit: int, prefix: str, app: Any
) -> Any:
    return channel.client.eval(
        DRAIN_SCRIPT,
        4,
        channel.unacked_key,
        channel.unacked_index_key,
        queue_key,
        record_key,
        limit,
        time(),
        RAW_MARK,
        prefix,
        int(app.conf.crm_settings.visibility_timeout_s) * 2,
        DRAIN_BYTES,
    )


def _untake(
    channel: Channel, queue_key: str, record_key: str, taken: list[tuple[str, bytes]]
) -> None:
    """Put messages back at the front of the queue as they were, in their order."""
    flat: list[str | bytes] = [part for tag_item in reversed(taken) for part in tag_item]
    channel.client.eval(
        UNTAKE_SCRIPT,
        4,
        channel.unacked_key,
        channel.unacked_index_key,
        queue_key,
        record_key,
        *flat,
    )


def _plain(
    channel: Channel, app: Any, item: bytes, task_name: str, limits: Limits
) -> tuple[str, Any] | None:
    """(task id, message) of a plain ``task_name`` message; None for anything else."""
    try:
        payload = loads(item)
        message = channel.Message(payload, channel=channel)
        headers = message.headers
        if (
            message.content_type != "application/json"
            or not isinstance(headers, dict)
            or headers.get("task") != task_name
            or headers.get("redelivered")
            or (message.delivery_info or {}).get("redelivered")
            or headers.get("eta") is not None
            or headers.get("expires") is not None
            or headers.get("retries") not in (None, 0)
            # Decompressed by the consumer only, within its bound (a pool process has none).
            or "compression" in headers
        ):
            return None
        admit(message, app.tasks, limits, datetime.now(UTC))
        args, kwargs, _embed = message.decode()
        task_id = headers.get("id")
        if not isinstance(task_id, str) or len(args) != 1 or kwargs:
            return None
        return task_id, args[0]
    except Refused:
        return None
    except Exception:  # not a message of ours to take: the consumer sees it as always
        log.debug("a queued message left to the consumer", exc_info=True)
        return None


def restore(channel: Channel, record_key: str) -> int:
    """Put what a task drained back in its queue, marked redelivered; how many were still
    unacknowledged."""
    tags = [bytes_to_str(tag) for tag in channel.client.lrange(record_key, 0, -1)]
    restored = 0
    for tag in tags:
        if channel.client.hexists(channel.unacked_key, tag):
            channel.qos.restore_by_tag(tag, leftmost=False)
            restored += 1
    channel.client.delete(record_key)
    return restored


def restore_drained_of(app: Any, task_name: str, task_id: str) -> int:
    """A task run again: put back what its first run drained (its process died holding them)."""
    channel = _channel(app)
    if channel is None:
        return 0
    with _discarding():
        restored = restore(channel, RECORD_PREFIX + task_id)
    if restored:
        log.warning(
            "%s %s: %d message(s) it had taken from the queue put back, marked redelivered",
            task_name,
            task_id,
            restored,
        )
    return restored
