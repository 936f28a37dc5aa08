"""The embedded broker's queues (``workers.transport.broker_fs``): each message once, in the
order sent, from a folder of many queued messages without reading it again for each."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection

TRANSPORT = "workers.transport.broker_fs:Transport"
# kombu keeps the bindings it declared for the whole process (its transport's class-level
# state): each test names queues of its own, or a binding made in another test's folder would
# be taken as made in this one.


@pytest.fixture
def connect(tmp_path: Path) -> Iterator[Callable[[], Connection]]:
    folder = tmp_path / "queue"
    folder.mkdir()
    opened: list[Connection] = []

    def connection() -> Connection:
        options = {
            "data_folder_in": str(folder),
            "data_folder_out": str(folder),
            "control_folder": str(tmp_path / "control"),
            "processed_folder": str(tmp_path / "processed"),
        }
        made = Connection(transport=TRANSPORT, transport_options=options)
        opened.append(made)
        return made

    yield connection
    for made in opened:
        made.release()


def drain(connection: Connection, name: str) -> list[Any]:
    queue = connection.SimpleQueue(name)
    taken: list[Any] = []
    while True:
        try:
            message = queue.get(block=False)
        except queue.Empty:
            return taken
        taken.append(message.payload)
        message.ack()


def test_a_backlog_is_taken_in_order_without_reading_the_folder_per_message(
    connect: Callable[[], Connection], monkeypatch: pytest.MonkeyPatch
) -> None:
    sender = connect()
    late, early = sender.SimpleQueue("late"), sender.SimpleQueue("early")
    for n in range(300):
        late.put({"n": n})
        if n % 10 == 0:
            early.put({"n": n})
    listings = 0
    listdir = os.listdir

    def counted(path: Any) -> list[str]:
        nonlocal listings
        listings += 1
        return listdir(path)

    monkeypatch.setattr(os, "listdir", counted)
    receiver = connect()
    assert drain(receiver, "early") == [{"n": n} for n in range(0, 300, 10)]
    assert drain(receiver, "late") == [{"n": n} for n in range(300)]
    # kombu's own read the folder for every message taken: 330 times and more.
    assert listings < 10


def test_a_message_sent_after_the_listing_is_taken_too(
    connect: Callable[[], Connection],
) -> None:
    sender, receiver = connect(), connect()
    queue = receiver.SimpleQueue("calls")
    sender.SimpleQueue("calls").put({"n": 1})
    first = queue.get(timeout=10)
    first.ack()
    sender.SimpleQueue("calls").put({"n": 2})
    second = queue.get(timeout=10)  # polls until the folder is listed again
    second.ack()
    assert [first.payload, second.payload] == [{"n": 1}, {"n": 2}]


def test_two_consumers_of_one_queue_take_each_message_once(
    connect: Callable[[], Connection],
) -> None:
    """A message one consumer listed may be taken by another first: it is skipped, not read."""
    sender = connect()
    for n in range(200):
        sender.SimpleQueue("shared").put({"n": n})
    one, other = connect().SimpleQueue("shared"), connect().SimpleQueue("shared")
    taken: list[int] = []
    while True:
        got = 0
        for queue in (one, other):
            try:
                message = queue.get(block=False)
            except queue.Empty:
                continue
            taken.append(message.payload["n"])
            message.ack()
            got += 1
        if not got:
            break
    assert sorted(taken) == list(range(200))


def test_a_file_that_is_no_message_is_set_aside_and_the_queue_goes_on(
    connect: Callable[[], Connection], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Not JSON, empty, JSON without kombu's envelope, a folder: each stopped the worker (kombu
    raised from its read); each is moved to unreadable/ with the reason in the log."""
    sender = connect()
    sender.SimpleQueue("junk").put({"n": 1})
    queue_folder = tmp_path / "queue"
    junk = {
        "00000000000000000001_a.junk.msg": b"not json",
        "00000000000000000002_b.junk.msg": b"",
        "00000000000000000003_c.junk.msg": b'{"body": "x"}',
    }
    for name, content in junk.items():
        (queue_folder / name).write_bytes(content)
    (queue_folder / "00000000000000000004_d.junk.msg").mkdir()
    sender.SimpleQueue("junk").put({"n": 2})
    assert drain(connect(), "junk") == [{"n": 1}, {"n": 2}]
    aside = tmp_path / "unreadable"
    assert sorted(p.name for p in aside.iterdir()) == [*junk, "00000000000000000004_d.junk.msg"]
    assert not [p for p in queue_folder.iterdir() if p.name.endswith(".msg")]
    said = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(said) == 4 and all("is no message" in line for line in said)
