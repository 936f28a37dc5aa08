"""kombu's Redis transport, made to survive the broker going away under a worker (DESIGN §5).

When Redis goes away (a restart, a failover) while the worker holds unacknowledged messages,
Celery collects the broken connection and closes it. With kombu's own Redis transport four
things can then go wrong, and this subclass changes exactly those:

1. Closing the connection closes its channels one after another; the first one whose close
   meets the dead broker raises, and the channels after it stay open. Celery then detaches the
   transport from its connection (``transport.client = None``), and a later close, poll or
   acknowledgement on such a channel builds its connection parameters from ``None``:
   ``AttributeError: 'NoneType' object has no attribute 'hostname'``. That is no connection
   error, so it can escape the reconnect logic ("Unrecoverable error") and stop the worker.
   Here every channel is closed even when one fails (:meth:`Transport.close_connection`), and
   a channel keeps the connection information it was opened with
   (:meth:`Channel._connparams`): a late acknowledgement still reaches Redis, and a late
   failure is a connection error.
2. A close that fails while deleting the channel's fanout bindings skips the rest of the close,
   the restoring of unacknowledged messages included. Here the close is finished without them.
3. A close that meets the dead broker cannot put the messages it held back into their queues,
   so they wait in the unacked hash for the visibility timeout (an hour in production). Here
   their delivery tags are kept (:class:`QoS`) and restored as soon as the process has a
   working channel to the same broker again (:meth:`Channel.__init__`).
4. BRPOP takes a message off its queue before its copy is written to the unacked hash; when the
   broker goes away in between, kombu drops the only copy. Here it is kept and put back in its
   queue on reconnection like the others (:meth:`QoS.append`).

5. BRPOP takes a message off its queue and sends it to the worker; a worker main process killed
   (SIGKILL, an out-of-memory kill) before it has read that reply and written the message to the
   unacked hash takes the only copy with it. Here a message is never popped by BRPOP: one Lua
   script moves it from its queue into the unacked hash (:data:`FETCH_SCRIPT`), atomically, and
   only then does the worker see it; a worker that dies holding it leaves it where the
   visibility timeout restores it. Since a script cannot block, an empty fetch is followed by a
   pause on the worker's event loop before the next one, 1 ms after the first empty fetch and
   doubling up to :data:`IDLE_WAIT_MAX_S` (20 ms) while the queues stay empty: a message
   published to a worker that has been idle for a while waits up to 20 ms more to be fetched
   (10 ms on average), one that comes soon after the last a few milliseconds; a busy worker
   fetches the next at once. Idle, a worker asks 50 times a second, which costs Redis and the
   worker a fraction of a percent of a core. (The pause is the loop's timer, not a blocking
   command on the server: Redis times blocked commands out only at its ``hz``, 10 times a second
   by default, and a 1 ms BLPOP on an otherwise idle server returns after up to 100 ms.) Where
   no event loop drives the channel, the pause is such a server-side wait.

No message is acknowledged by any of this, and none is put back twice: each restore moves one
message from the unacked hash (or from this process's copy, when the hash never got one) to its
queue in one Redis transaction, as kombu's own restore at close does, and leaves alone a message
acknowledged since. What a process could not put back (it stopped first) still comes back after
the visibility timeout, except a message of case 4, which only that process held.

Used for ``redis://`` broker URLs (workers/app.py); ``rediss://`` and ``redis+socket://`` keep
kombu's transport, which the URL selects (naming a transport would drop their TLS/socket setup).
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from queue import Empty
from time import monotonic, time
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

logger = logging.getLogger(__name__)

#: Messages this process held when the broker went away, by (broker URL, unacked hash key):
#: delivery tag -> the message as kombu stores it (payload, exchange, routing key), or None
#: when the unacked hash has it.
_pending: dict[tuple[str, str], dict[str, list[Any] | None]] = {}
_pending_lock = threading.Lock()


#: Moves the first message of the first non-empty queue (KEYS[3:], in the order BRPOP would
#: look) into the unacked hash (KEYS[1]) and its index (KEYS[2]) under a fetch tag (ARGV[1],
#: scored ARGV[2]), as ``RAW_MARK<queue key>\n<message>``, and returns ``{queue key, message}``.
FETCH_SCRIPT = """
for i = 3, #KEYS do
  local item = redis.call('RPOP', KEYS[i])
  if item then
    redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
    redis.call('HSET', KEYS[1], ARGV[1], ARGV[3] .. KEYS[i] .. '\\n' .. item)
    return {KEYS[i], item}
  end
end
return false
"""
#: Marks an unacked entry written by the fetch script, before the worker rewrote it in kombu's
#: form under the message's own delivery tag.
RAW_MARK = "crm-fetched:"
#: After an empty fetch, the pause before the next one: the first, and the most it doubles to
#: while the queues stay empty.
IDLE_WAIT_MIN_S = 0.001
IDLE_WAIT_MAX_S = 0.02
#: Without an event loop, the pause is a BLPOP on this key, which nothing is pushed to.
IDLE_KEY = "_kombu.crm.idle"


def split_raw(stored: Any) -> tuple[str, str] | None:
    """(queue key, message) of an unacked entry the fetch script wrote; None for kombu's own."""
    text = bytes_to_str(stored)
    if not text.startswith(RAW_MARK):
        return None
    queue_key, _, item = text[len(RAW_MARK) :].partition("\n")
    return queue_key, item


def _forget_pending() -> None:
    # A forked pool process must not restore its parent's messages.
    _pending.clear()


os.register_at_fork(after_in_child=_forget_pending)


def _defer(key: tuple[str, str], messages: dict[str, list[Any] | None]) -> None:
    with _pending_lock:
        held = _pending.setdefault(key, {})
        for tag, saved in messages.items():
            held[tag] = held.get(tag) or saved


def _take(key: tuple[str, str]) -> dict[str, list[Any] | None]:
    with _pending_lock:
        return _pending.pop(key, {})


class _Detached:
    """What :meth:`Channel._connparams` reads of a transport, for a channel whose transport was
    detached from its connection or which was closed already."""

    def __init__(self, client: Any, default_port: int) -> None:
        self.client = client
        self.default_port = default_port


class QoS(kombu_redis.QoS):
    def append(self, message: Any, delivery_tag: str) -> None:
        fetch_tag = self.channel.take_fetch_tag()
        if fetch_tag is not None:
            self._append_fetched(message, delivery_tag, fetch_tag)
            return
        try:
            super().append(message, delivery_tag)
        except self.channel.connection_errors:
            # BRPOP has taken the message off its queue but the broker went away before its
            # copy reached the unacked hash: this process holds the only copy. It is not
            # handed to the worker; it goes back to its queue when the connection is back.
            info = message.delivery_info
            saved = [message._raw, info["exchange"], info["routing_key"]]
            _defer(self.channel.pending_key, {delivery_tag: saved})
            raise

    def _append_fetched(self, message: Any, delivery_tag: str, fetch_tag: str) -> None:
        """Rewrite the fetch script's entry in kombu's form under the message's own delivery
        tag, in one transaction (the entry stays restorable whatever happens in between)."""
        info = message.delivery_info
        try:
            with self.pipe_or_acquire() as pipe:
                pipe.zadd(self.unacked_index_key, {delivery_tag: time()}).hset(
                    self.unacked_key,
                    delivery_tag,
                    dumps([message._raw, info["exchange"], info["routing_key"]]),
                ).zrem(self.unacked_index_key, fetch_tag).hdel(self.unacked_key, fetch_tag)
                pipe.execute()
        except self.channel.connection_errors:
            # The broker still has the fetched copy: restore it from there once it is back.
            _defer(self.channel.pending_key, {fetch_tag: None})
            raise
        virtual.QoS.append(self, message, delivery_tag)

    def restore_by_tag(self, tag: str, client: Any = None, leftmost: bool = False) -> None:
        def restore_transaction(pipe: Any) -> None:
            stored = pipe.hget(self.unacked_key, tag)
            pipe.multi()
            self._remove_from_indices(tag, pipe)
            if stored:
                self.channel.restore_stored(stored, pipe, leftmost)

        with self.channel.conn_or_acquire(client) as client:
            client.transaction(restore_transaction, self.unacked_key)

    def restore_unacked(self, client: Any = None) -> None:
        delivered: Any = self._delivered  # a dict of delivery tags (None in kombu's stubs)
        tags = list(delivered)
        try:
            super().restore_unacked(client)
        except self.channel.connection_errors as exc:
            # Each restore is its own transaction: what was restored is gone from the unacked
            # hash, and restoring it again later does nothing.
            delivered.clear()
            _defer(self.channel.pending_key, dict.fromkeys(tags))
            logger.warning(
                "broker unreachable while restoring %d unacknowledged message(s) (%r):"
                " they are restored when the connection is back",
                len(tags),
                exc,
            )


class Channel(kombu_redis.Channel):
    QoS = QoS

    def __init__(self, connection: Any, *args: Any, **kwargs: Any) -> None:
        # Kept for _connparams once the transport is detached (the base class connects with it).
        self._conninfo = connection.client
        self._default_port = connection.default_port
        #: The tag of the fetch whose reply is awaited or being delivered; whether the last
        #: fetch found nothing (the next command waits first).
        self._fetch_tag: str | None = None
        self._delivering_tag: str | None = None
        self._idle = False
        self._waiting = False
        #: The pause after the last empty fetch; whether the loop's timer has yet to end it.
        self._idle_wait = 0.0
        self._resting = False
        super().__init__(connection, *args, **kwargs)  # connects (PING) or raises
        self.pending_key = (self._conninfo.as_uri(include_password=True), self.unacked_key)
        self._restore_pending()

    # -- fetching: a message moves from its queue to the unacked hash in one step ------------

    def _brpop_start(self, timeout: Any = None) -> None:
        if self.global_keyprefix:  # keys the script would have to prefix itself: kombu's way
            super()._brpop_start(timeout)
            return
        if self._resting:  # the loop's timer ends the pause (_rest), the next tick fetches
            return
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        connection = self.client.connection
        self._in_poll = connection
        self._brpop_sent_at = monotonic()  # type: ignore[assignment]  # kombu's stubs: None
        if self._idle:
            self._waiting = True
            connection.send_command("BLPOP", IDLE_KEY, self._idle_wait)
            return
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        self._fetch_tag = f"{RAW_MARK}{uuid.uuid4()}"
        connection.send_command(
            "EVAL",
            FETCH_SCRIPT,
            2 + len(keys),
            self.unacked_key,
            self.unacked_index_key,
            *keys,
            self._fetch_tag,
            time(),
            RAW_MARK,
        )

    def _brpop_read(self, **options: Any) -> bool:
        if self.global_keyprefix:
            return bool(super()._brpop_read(**options))
        try:
            command = "BLPOP" if self._waiting else "EVAL"
            try:
                reply = self.client.parse_response(self.client.connection, command, **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if self._waiting:
                self._waiting = False
                self._idle = False
                raise Empty()
            if not reply:
                self._rest()
                raise Empty()
            self._idle_wait = 0.0
            queue_key, item = (bytes_to_str(part) for part in reply)
            queue = queue_key.rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(queue)
            self._delivering_tag = self._fetch_tag
            try:
                self.connection._deliver(loads(item), queue)
            finally:
                self._delivering_tag = None
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]  # kombu's stubs: bool
            self._fetch_tag = None
            self._flush_brpop_reauth()

    def _rest(self) -> None:
        """Pause before the next fetch: on the worker's event loop, a timer ends the pause;
        without one, the next command is a server-side wait."""
        self._idle_wait = min(IDLE_WAIT_MAX_S, max(IDLE_WAIT_MIN_S, self._idle_wait * 2))
        loop = getattr(self.connection, "loop", None)
        if loop is None:
            self._idle = True
            return
        self._resting = True
        loop.call_later(self._idle_wait, self._end_rest)

    def _end_rest(self) -> None:
        self._resting = False

    def take_fetch_tag(self) -> str | None:
        """The fetch tag of the message being delivered now (once), for :meth:`QoS.append`."""
        tag, self._delivering_tag = self._delivering_tag, None
        return tag

    def restore_stored(self, stored: Any, pipe: Any, leftmost: bool) -> None:
        """Put an unacked entry back in its queue (within ``pipe``'s transaction): kombu's
        form, or one the fetch script wrote and no worker rewrote."""
        raw = split_raw(stored)
        if raw is None:
            payload, exchange, routing_key = loads(bytes_to_str(stored))
            self._do_restore_message(payload, exchange, routing_key, pipe, leftmost)
            return
        queue_key, item = raw
        try:
            payload = loads(item)
            payload["headers"]["redelivered"] = True
            payload["properties"]["delivery_info"]["redelivered"] = True
            item = dumps(payload)
        except Exception:  # not kombu's envelope: back as it came, for the consumer to refuse
            pass
        (pipe.lpush if leftmost else pipe.rpush)(queue_key, item)

    def _restore_pending(self) -> None:
        held = _take(self.pending_key)
        if not held:
            return
        restored = 0
        try:
            for tag in sorted(held):
                self._restore_held(tag, held[tag])
                del held[tag]
                restored += 1
        except self.connection_errors:
            _defer(self.pending_key, held)  # the next channel tries again
        logger.warning(
            "%d message(s) held when the broker connection was lost put back in their queues"
            " unless acknowledged since (%d left for the next connection)",
            restored,
            len(held),
        )

    def _restore_held(self, tag: str, saved: list[Any] | None) -> None:
        """Put one held message back in its queue, in one transaction: the unacked hash's copy
        if it has one (moved, as kombu's restore does), else the copy this process saved; a
        message acknowledged since (no copy, none saved) is left alone."""

        def restore(pipe: Any) -> None:
            stored = pipe.hget(self.unacked_key, tag)
            pipe.multi()
            self.qos._remove_from_indices(tag, pipe)
            if stored:
                self.restore_stored(stored, pipe, False)
            elif saved:
                payload, exchange, routing_key = saved
                self._do_restore_message(payload, exchange, routing_key, pipe, False)

        with self.conn_or_acquire() as client:
            client.transaction(restore, self.unacked_key)

    def _connparams(self, asynchronous: bool = False) -> Any:
        transport = self.connection
        if transport is not None and transport.client is not None:
            return super()._connparams(asynchronous=asynchronous)
        self.connection = _Detached(self._conninfo, self._default_port)
        try:
            return super()._connparams(asynchronous=asynchronous)
        finally:
            self.connection = transport

    def close(self) -> None:
        try:
            super().close()
        except self.connection_errors:
            if not self.closed:
                # The fanout cleanup met the dead broker: finish the close without it.
                self._disconnect_pools()
                self._close_clients()
                virtual.Channel.close(self)
            raise


class Transport(kombu_redis.Transport):
    Channel = Channel
    #: The worker's event loop (kombu's hub) once the worker registers the transport with it:
    #: a channel's pause after an empty fetch is a timer on it.
    loop: Any = None

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        self.loop = loop
        super().register_with_event_loop(connection, loop)

    def close_connection(self, connection: Any) -> None:
        """Close every channel, even when closing one of them fails (the first error is raised
        after all of them are closed)."""
        cycle: Any = self.cycle  # kombu's stubs declare None for these
        cycle.close()
        first: BaseException | None = None
        lists: tuple[Any, ...] = (self._avail_channels, self.channels)
        for channels in lists:
            while channels:
                channel: Any = channels.pop()
                try:
                    channel.close()
                except Exception as exc:  # re-raised below
                    first = first or exc
        if first is not None:
            raise first
