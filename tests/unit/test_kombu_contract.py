"""The private parts of kombu that workers/transport builds on are still there.

``broker_redis`` and ``broker_fs`` subclass kombu's transports and override or call methods that
kombu does not promise to keep. pyproject.toml pins kombu to one minor version; this test says
which names a new version must still have (with the same parameters) before the pin moves.
"""

from __future__ import annotations

import inspect

import kombu
import pytest
from kombu.transport import filesystem, virtual
from kombu.transport import redis as kombu_redis

from workers.transport import broker_fs, broker_redis

#: (class, method, parameters it must take) for what the subclasses override or call.
USED = [
    (kombu_redis.Channel, "_brpop_start", ["self", "timeout"]),
    (kombu_redis.Channel, "_brpop_read", ["self"]),
    (kombu_redis.Channel, "_do_restore_message",
     ["self", "payload", "exchange", "routing_key", "pipe", "leftmost"]),
    (kombu_redis.Channel, "_q_for_pri", ["self", "queue", "pri"]),
    (kombu_redis.Channel, "_connparams", ["self", "asynchronous"]),
    (kombu_redis.Channel, "_flush_brpop_reauth", ["self"]),
    (kombu_redis.Channel, "_disconnect_pools", ["self"]),
    (kombu_redis.Channel, "_close_clients", ["self"]),
    (kombu_redis.Channel, "conn_or_acquire", ["self", "client"]),
    (kombu_redis.QoS, "append", ["self", "message", "delivery_tag"]),
    (kombu_redis.QoS, "restore_by_tag", ["self", "tag", "client", "leftmost"]),
    (kombu_redis.QoS, "restore_unacked", ["self", "client"]),
    (kombu_redis.QoS, "restore_visible", ["self", "start", "num", "interval"]),
    (kombu_redis.QoS, "_remove_from_indices", ["self", "delivery_tag", "pipe"]),
    (kombu_redis.QoS, "pipe_or_acquire", ["self", "pipe", "client"]),
    (kombu_redis.MultiChannelPoller, "_register_BRPOP", ["self", "channel"]),
    (kombu_redis.Transport, "register_with_event_loop", ["self", "connection", "loop"]),
    (virtual.QoS, "append", ["self", "message", "delivery_tag"]),
    (filesystem.Channel, "_put", ["self", "queue", "payload"]),
    (filesystem.Channel, "_restore", ["self", "message"]),
    (filesystem.Channel, "_get", ["self", "queue"]),
]  # fmt: skip


@pytest.mark.parametrize(("owner", "name", "parameters"), USED)
def test_kombu_still_has_what_the_transports_build_on(
    owner: type, name: str, parameters: list[str]
) -> None:
    method = getattr(owner, name, None)
    assert callable(method), f"kombu {kombu.__version__}: {owner.__name__}.{name} is gone"
    taken = list(inspect.signature(method).parameters)
    assert taken[: len(parameters)] == parameters, (
        f"kombu {kombu.__version__}: {owner.__name__}.{name}{inspect.signature(method)}"
    )


def test_the_channel_attributes_the_fetch_reads_are_still_set() -> None:
    source = inspect.getsource(kombu_redis.Channel)
    for attribute in ("_in_poll", "_brpop_sent_at", "_queue_cycle", "active_queues"):
        assert f"self.{attribute}" in source, attribute
    assert broker_redis.Channel.__mro__[1] is kombu_redis.Channel
    assert broker_fs.Channel.__mro__[1] is filesystem.Channel
    for attribute in ("data_folder_in", "store_processed", "processed_folder"):
        assert attribute in vars(filesystem.Channel), attribute  # cached properties


def test_kombu_is_pinned_to_the_minor_version_this_was_checked_against() -> None:
    major, minor = kombu.__version__.split(".")[:2]
    assert (major, minor) == ("5", "7"), (
        "kombu moved: check the transports against it (this file), then move the pin"
    )
