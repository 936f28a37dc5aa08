"""Every message schema under fuzzing: near-valid and arbitrary messages through the real
ingest tasks on PostgreSQL. Each ends as an event outcome or a rejection with its reason, within
the time bound; nothing else escapes a task."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import example, given, settings

from tests.fuzz.conftest import IngestRunner
from tests.fuzz.emails import raw_emails
from tests.fuzz.profiles import examples
from tests.fuzz.strategies import EXAMPLE_WORLD, messages

#: Times at the ends of the calendar, which overflow when converted to UTC.
EDGE_TIMES = ["9999-12-31T23:59:59-12:00", "0001-01-01T00:00:00+14:00", "0001-01-01T00:00:00"]
#: Inputs kept as explicit examples besides the generated ones.
FOUND: dict[str, list[Any]] = {
    "call": [
        {
            "schema": "crm.call/1",
            "source_system": "pbx-hki",
            "call_id": f"c-edge-{index}",
            "status": "completed",
            "direction": "inbound",
            "from": "040 123 4567",
            field: time,
        }
        for index, time in enumerate(EDGE_TIMES)
        for field in ("started_at", "ended_at")
    ],
    "visit": [
        {
            "schema": "crm.visit/1",
            "source_system": "field-app",
            "visit_id": f"v-edge-{index}",
            "seller": "anna",
            "customer_number": "10001",
            "started_at": time,
            "updated_at": time,
        }
        for index, time in enumerate(EDGE_TIMES)
    ],
    "party": [],
    "target": [
        {
            "schema": "crm.target/1",
            "source_system": "erp",
            "seller": "anna",
            "category": "sales_action",
            "kind": kind,
            "value": 1,
            "valid_from": day,
        }
        for day in ("0001-01-01", "9999-12-31")
        for kind in ("weekly", "monthly")
    ],
    "email": [],
    "document": [],
    "task": [],
}


def fuzz_kind(kind: str, count: int) -> Any:
    @settings(max_examples=examples(count))
    @given(message=messages(kind, EXAMPLE_WORLD, raw_emails()))
    def check(runner: IngestRunner, message: Any) -> None:
        runner.check(kind, message)

    for found in FOUND[kind]:
        check = example(message=found)(check)
    return check


test_call_messages = fuzz_kind("call", 100)
test_visit_messages = fuzz_kind("visit", 80)
test_party_messages = fuzz_kind("party", 60)
test_target_messages = fuzz_kind("target", 50)
test_email_messages = fuzz_kind("email", 40)
test_document_messages = fuzz_kind("document", 40)
test_task_messages = fuzz_kind("task", 40)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("call", {"schema": "crm.call/1", "source_system": "pbx-hki", "call_id": "c-\ud800"}),
        (
            "visit",
            {
                "schema": "crm.visit/1",
                "source_system": "field-app",
                "visit_id": "v-1",
                "seller": "anna",
                "started_at": "2026-11-24T10:00:00+02:00",
                "memo\udc80": "a field name that is not text",
            },
        ),
        (
            "target",
            {
                "schema": "crm.target/1",
                "source_system": "erp",
                "seller": "anna",
                "category": "sales_action",
                "kind": "weekly",
                "value": float("nan"),
                "valid_from": "2026-11-02",
            },
        ),
        ("party", {"schema": "crm.party/1", "kind": "staff", "username": float("inf")}),
    ],
)
def test_values_json_carries_but_no_database_keeps(
    runner: IngestRunner, kind: str, message: Any
) -> None:
    """NaN, infinities and lone surrogates (Python's JSON reads all three) are rejected with
    the path of the value, and the rejection is recorded."""
    result = runner.check(kind, message)
    assert result.outcome == "rejected"
    assert result.reason and ("surrogate" in result.reason or "not a JSON number" in result.reason)
