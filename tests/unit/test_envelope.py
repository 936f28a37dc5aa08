"""The envelope check's rules, and what a refused message is recorded under."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from workers.transport.consumer import ledger_task_id
from workers.transport.envelope import (
    MAX_DEPTH,
    Limits,
    Refused,
    check_eta,
    check_nesting,
    check_task_id,
    clamped_time_limits,
)
from workers.transport.pool_health import guard_hand_off, stuck_requests

LIMITS = Limits(
    max_body_bytes=1000, hard_time_limit_s=300, soft_time_limit_s=270, max_eta_ahead_s=3300
)
NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def test_the_time_limits_a_producer_asks_for_never_exceed_the_workers() -> None:
    assert clamped_time_limits([100_000, 99_000], LIMITS) == [300, 270]
    assert clamped_time_limits([10, 5], LIMITS) == [10, 5]  # lower ones are the producer's
    assert clamped_time_limits([None, 1e9], LIMITS) == [None, 270]
    assert clamped_time_limits(None, LIMITS) == [None, None]
    assert clamped_time_limits([0, 0], LIMITS) == [None, None]  # 0 means "the default"
    for bad in ([1], [1, 2, 3], ["1", 2], [-1, None], [float("inf"), None], [True, None], 5):
        with pytest.raises(Refused, match="'timelimit' must be"):
            clamped_time_limits(bad, LIMITS)


def test_nesting_is_measured_without_recursion() -> None:
    value: Any = "x"
    for level in range(MAX_DEPTH):
        value = {"k": value} if level % 2 else [value]
    check_nesting(value, "body")
    with pytest.raises(Refused):
        check_nesting([value], "body")
    deep: Any = 1
    for _ in range(200_000):  # far past Python's recursion limit
        deep = [deep]
    with pytest.raises(Refused, match=f"nested deeper than {MAX_DEPTH} levels"):
        check_nesting(deep, "body")


@pytest.mark.parametrize(
    ("task_id", "said"),
    [
        ("x" * 101, "101 characters long"),
        ("", "non-empty string"),
        (None, "non-empty string"),
        (7, "non-empty string, not int 7"),
        ("a\x00b", "control or unprintable"),
        ("a\ud800", "control or unprintable"),
    ],
)
def test_task_ids_the_ledger_cannot_key_are_refused(task_id: Any, said: str) -> None:
    with pytest.raises(Refused, match=said):
        check_task_id(task_id)


def test_a_refused_message_is_recorded_under_a_stable_id_that_fits() -> None:
    assert ledger_task_id("abc") == "abc"
    assert ledger_task_id(None) is None and ledger_task_id("") is None
    long_id = ledger_task_id("L" * 150)
    assert long_id is not None and len(long_id) <= 100 and long_id.startswith("L" * 40 + "~")
    assert ledger_task_id("L" * 150) == long_id != ledger_task_id("L" * 151)
    odd = ledger_task_id("a\x00\ud800b")
    assert odd is not None and odd.isprintable() and "?" in odd
    assert ledger_task_id(["a"]) != ledger_task_id(["b"])


def test_an_eta_is_bounded_by_the_visibility_window() -> None:
    check_eta(None, LIMITS, NOW)
    check_eta((NOW + timedelta(seconds=3000)).isoformat(), LIMITS, NOW)
    check_eta((NOW - timedelta(days=3)).isoformat(), LIMITS, NOW)  # overdue: runs at once
    check_eta("2026-12-04T12:30:00", LIMITS, NOW)  # naive: UTC, as Celery sends it
    with pytest.raises(Refused, match="3600 s ahead; at most 3300 s"):
        check_eta((NOW + timedelta(hours=1)).isoformat(), LIMITS, NOW)
    with pytest.raises(Refused, match="not an ISO 8601 time"):
        check_eta("tomorrow", LIMITS, NOW)
    with pytest.raises(Refused, match="must be an ISO 8601 time"):
        check_eta(12, LIMITS, NOW)


class Controller:
    """The two members of Celery's WorkController that the hand-off guard uses."""

    def __init__(self, fails_with: BaseException | None) -> None:
        self.fails_with = fails_with
        self.released = 0
        self.handed: list[Any] = []

    def _process_task(self, request: Any) -> None:
        self.handed.append(request)
        if self.fails_with is not None:
            raise self.fails_with

    def _quick_release(self) -> None:
        self.released += 1


class Request:
    def __init__(self, task_id: str) -> None:
        self.id = task_id
        self.name = "crm.ingest.call"
        self.time_start = None


def test_a_failed_hand_off_gives_the_pool_slot_back_and_is_recorded() -> None:
    controller = Controller(RecursionError("maximum recursion depth exceeded while pickling"))
    recorded: list[tuple[Any, BaseException]] = []
    hand_off = guard_hand_off(controller, lambda request, exc: recorded.append((request, exc)))
    request = Request("r-1")
    hand_off(request)
    assert controller.released == 1
    assert recorded == [(request, controller.fails_with)]
    assert stuck_requests(0.0) == []  # not left waiting for a process either


def test_a_request_no_process_starts_is_reported_as_stuck() -> None:
    controller = Controller(None)
    hand_off = guard_hand_off(controller, lambda request, exc: None)
    from celery.worker import state as worker_state

    request = Request("r-2")
    worker_state.reserved_requests.add(request)  # what Celery's strategy does on receipt
    try:
        hand_off(request)
        assert stuck_requests(60.0) == []
        [stuck] = stuck_requests(-1.0)
        assert (stuck["id"], stuck["task"]) == ("r-2", "crm.ingest.call")
        request.time_start = 1.0  # type: ignore[assignment]  # a pool process accepted it
        assert stuck_requests(-1.0) == []
    finally:
        worker_state.reserved_requests.discard(request)
