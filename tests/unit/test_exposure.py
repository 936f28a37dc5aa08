"""A task's arguments are shown by kind, source and ids, never by their personal contents."""

from __future__ import annotations

import base64
import logging
from typing import Any

import pytest

from config.settings import Settings
from workers.app import create_app
from workers.exposure import PoolArgumentsFilter, summarise, summarise_arguments

EMAIL = {
    "schema": "crm.email/1",
    "source_system": "smtp-gateway",
    "mail_from": "matti.virtanen@pohjolankone.fi",
    "rcpt_to": ["crm@myyntitalo.fi"],
    "raw_b64": base64.b64encode(b"From: Matti Virtanen\r\n\r\nhuoltosopimus").decode(),
}
CALL = {
    "schema": "crm.call/1",
    "source_system": "asterisk",
    "call_id": "1701.42",
    "from": "+358 40 123 4567",
    "note": "soitti tarjouksesta",
}


def test_a_message_shows_its_kind_source_and_ids_only() -> None:
    assert summarise(EMAIL) == "crm.email/1 from smtp-gateway: raw_b64 of 52 characters"
    assert summarise(CALL) == "crm.call/1 from asterisk: call_id 1701.42"
    batch = {
        "schema": "crm.batch/1",
        "source_system": "import",
        "kind": "call",
        "messages": [CALL] * 3,
    }
    assert summarise(batch) == "crm.batch/1 from import: kind call, 3 messages"
    contact = {
        "schema": "crm.party/1",
        "kind": "contact",
        "customer_number": "10002",
        "name": "Sanna",
    }
    assert summarise(contact) == "crm.party/1: kind contact, customer_number 10002"


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (17, "17"),
        (None, "None"),
        (True, "True"),
        ("matti.virtanen@pohjolankone.fi", "<text of 30 characters>"),
        (["+358 40 123 4567"], "<list of 1>"),
        ({"name": "Matti"}, "a message"),
        ({"schema": {"nested": "Matti"}, "source_system": ["x"], "call_id": True}, "a message"),
        ({"schema": "s" * 5000}, "s" * 99 + "…"),
        (b"bytes", "<bytes>"),
    ],
)
def test_any_argument_is_summarised_without_its_contents(value: Any, shown: str) -> None:
    assert summarise(value) == shown


def test_the_arguments_of_a_task() -> None:
    args, kwargs = summarise_arguments([EMAIL], {"message": CALL, "attempt": 1})
    assert args == "(crm.email/1 from smtp-gateway: raw_b64 of 52 characters)"
    assert kwargs == "{message=crm.call/1 from asterisk: call_id 1701.42, attempt=1}"
    assert summarise_arguments("not a list", None) == ("(<text of 10 characters>)", "{None}")
    args, _ = summarise_arguments(list(range(8)), {})
    assert args == "(0, 1, 2, 3, 4, and 3 more)"


def test_the_pool_s_debug_line_loses_the_message_body() -> None:
    record = logging.LogRecord(
        "celery.pool",
        logging.DEBUG,
        __file__,
        1,
        "TaskPool: Apply %s (args:%s kwargs:%s)",
        ("<function trace>", f"('crm.ingest.email', {EMAIL!r})", "{}"),
        None,
    )
    assert PoolArgumentsFilter().filter(record)
    assert record.getMessage() == "TaskPool: Apply <function trace> (arguments not logged)"


def test_our_producers_send_the_summary_in_the_headers(settings: Settings) -> None:
    """The command line, the gateways and beat publish through the app: the broker's copy of
    the headers and the task-sent event show what the worker will show."""
    app = create_app(settings)
    message = app.amqp.create_task_message(
        "id-1", "crm.ingest.email", [EMAIL], {}, create_sent_event=True
    )
    shown = "(crm.email/1 from smtp-gateway: raw_b64 of 52 characters)"
    assert message.headers["argsrepr"] == shown
    assert message.headers["kwargsrepr"] == "{}"
    assert message.sent_event["args"] == shown
