"""A bounded fuzz run against the real worker: a sample of generated messages of every kind,
published through Redis to the session's worker process.

Every message gets a delivery outcome, none is recorded as a bug, and the worker is still
alive and processes a valid message afterwards. The messages name only parties of their own
(tests.fuzz.strategies.FUZZ_WORLD), so the other tests' customers, sellers and tallies are
left as they were.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

import tests.fuzz.profiles  # noqa: F401  (registers and loads the Hypothesis profile)
from models.ledger import FailedMessage, RejectedMessage
from tests.fuzz.emails import raw_emails
from tests.fuzz.profiles import PROFILE
from tests.fuzz.strategies import FUZZ_WORLD, messages
from tests.integration.conftest import LiveSystem

pytestmark = pytest.mark.integration

#: Messages per kind (emails cost the most, calls and visits are the most varied).
SAMPLE = {"call": 30, "visit": 30, "party": 20, "target": 20, "email": 20}
EVENT_OUTCOMES = {"stored", "done", "duplicate", "outdated"}

#: The sample world's names that the email strategy writes into forward blocks and bodies,
#: and names of the fuzz world to write instead.
AWAY_FROM_EXAMPLES = [
    (rb"anna\.lahtinen@myyntitalo\.fi", b"fuzz.seller@fuzz-company.example"),
    (rb"[\w.]+@pohjolankone\.fi|[\w.]+@jsahko\.fi", b"fuzz.contact@fuzz-customer.example"),
    (rb"1000([12])", rb"9000\1"),
]


def sample(strategy: st.SearchStrategy[Any], count: int) -> list[Any]:
    """``count`` values of ``strategy``, the same ones on every run under the ci profile."""
    found: list[Any] = []

    @settings(
        max_examples=count,
        phases=[Phase.generate],
        database=None,
        derandomize=PROFILE == "ci",
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(value: Any) -> None:
        found.append(value)

    collect()
    return found


def loopback_only(message: Any) -> Any:
    """Recording URLs point at a closed loopback port: the worker never fetches from outside."""
    recording = message.get("recording") if isinstance(message, dict) else None
    if isinstance(recording, dict) and recording.get("url"):
        recording["url"] = "http://127.0.0.1:9/recording.mp3"
    return message


def live_raw_emails() -> st.SearchStrategy[bytes]:
    def away(raw: bytes) -> bytes:
        for pattern, replacement in AWAY_FROM_EXAMPLES:
            raw = re.sub(pattern, replacement, raw)
        return raw

    return raw_emails(FUZZ_WORLD).map(away)


@pytest.mark.parametrize("kind", sorted(SAMPLE))
def test_fuzzed_messages_through_the_worker(live: LiveSystem, kind: str) -> None:
    generated = sample(messages(kind, FUZZ_WORLD, live_raw_emails()), SAMPLE[kind])
    batch = [loopback_only(message) for message in generated]
    deliveries = live.publish(kind, batch, timeout=120)
    task_ids = [delivery.task_id for delivery in deliveries]
    for delivery in deliveries:
        assert delivery.outcome in EVENT_OUTCOMES | {"rejected"}, (
            delivery.outcome,
            delivery.detail,
        )
    with live.sessions() as session:
        failures = session.scalars(
            select(FailedMessage).where(FailedMessage.task_id.in_(task_ids))
        ).all()
        assert not failures, [(f.kind, f.exception) for f in failures]
        reasons = session.scalars(
            select(RejectedMessage.reason).where(RejectedMessage.task_id.in_(task_ids))
        ).all()
    assert all(reason.strip() for reason in reasons)
    assert len(reasons) == sum(d.outcome == "rejected" for d in deliveries)
    assert live.alive(), live.tail()


def test_the_worker_still_processes_a_valid_message(live: LiveSystem) -> None:
    """After the fuzzed messages (the tests above run first): the same worker, a valid call."""
    call = {
        "schema": "crm.call/1",
        "source_system": "fuzz-live",
        "call_id": "after-fuzzing",
        "status": "completed",
        "direction": "inbound",
        "from": "+358 40 900 0009",
        "started_at": "2026-11-23T09:14:05+02:00",
    }
    [delivery] = live.publish("call", [call])
    assert delivery.outcome == "stored", delivery.detail
    assert live.alive(), live.tail()
