"""Tallies, periods, reconcile, seller cards and targets, from stored events on a real database."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from config.settings import load_settings
from models.db import COUNT_INTERNAL_CALLS, create_session_factory
from models.events import CrmEvent
from models.parties import Staff
from models.targets import SellerView, Tally
from tasks.context import StageContext
from tasks.errors import BadInput
from tasks.ingest.call import ingest_call
from tasks.ingest.party import ingest_party
from tasks.ingest.visit import ingest_visit
from tasks.maintenance import reconcile
from tasks.periods import day_keys, period_bounds, period_dates, period_keys
from tasks.refresh import refresh_seller
from tasks.stats import statistics
from tasks.targets import set_target, target_changes, target_history
from tasks.views import seller_cards, target_in_force, targets_progress
from tests.conftest import load_example
from tests.messages import outbound_call

HELSINKI = ZoneInfo("Europe/Helsinki")


def call(call_id: str, started_at: str, *, agent: str = "anna", **fields: Any) -> dict[str, Any]:
    return outbound_call(call_id, started_at, agent, **{"duration_s": 60, **fields})


def ingest(db: Session, ctx: StageContext, *messages: dict[str, Any]) -> None:
    for message in messages:
        assert ingest_call(db, ctx, message).outcome == "stored"


def staff(db: Session, username: str) -> Staff:
    found = db.scalar(select(Staff).where(Staff.username == username))
    assert found is not None
    return found


def tallies(db: Session, seller_id: int) -> dict[tuple[str, str], int]:
    """The seller's non-zero tally rows as {(category, period): count}."""
    return {
        (t.category_code, t.period): t.count
        for t in db.scalars(select(Tally).where(Tally.seller_id == seller_id))
        if t.count
    }


def refresh_all(db: Session, ctx: StageContext) -> None:
    """What the worker does after each change: nothing left to count, only to tell."""
    for seller_id in db.scalars(select(Staff.id)):
        refresh_seller(db, ctx, seller_id)


# -- tallies after refresh ------------------------------------------------------------------------


def test_tally_rows_equal_the_counts(world: Session, ctx: StageContext) -> None:
    anna, mikko = staff(world, "anna"), staff(world, "mikko")
    ingest(
        world,
        ctx,
        call("t-1", "2026-11-23T09:00:00+02:00"),
        call("t-2", "2026-11-24T09:00:00+02:00"),
        call("t-3", "2026-11-25T09:00:00+02:00", category="sales_action"),
        call("t-4", "2026-11-17T09:00:00+02:00", category="sales_action"),
        call("t-5", "2026-12-02T09:00:00+02:00"),
        call("t-6", "2026-11-24T09:00:00+02:00", agent="mikko"),
    )
    # Counted as each change was stored: no refresh needed for the tallies to be right.
    expected = {
        ("crm_event", "2026-W48"): 2,
        ("crm_event", "2026-11"): 2,
        ("crm_event", "2026-W49"): 1,
        ("crm_event", "2026-12"): 1,
        ("sales_action", "2026-W48"): 1,
        ("sales_action", "2026-W47"): 1,
        ("sales_action", "2026-11"): 2,
    }
    assert tallies(world, anna.id) == expected
    assert tallies(world, mikko.id) == {("crm_event", "2026-W48"): 1, ("crm_event", "2026-11"): 1}
    # The refresh tells the screens the current week's and month's counts, and remembers them.
    thursday = datetime(2026, 11, 26, 12, 0, tzinfo=HELSINKI)
    notification = refresh_seller(world, ctx, anna.id, now=thursday)
    assert notification is not None
    assert (notification["seller"], notification["week"], notification["month"]) == (
        "anna",
        "2026-W48",
        "2026-11",
    )
    assert notification["tallies"] == {
        "crm_event/2026-W48": 2,
        "crm_event/2026-11": 2,
        "sales_action/2026-W48": 1,
        "sales_action/2026-11": 2,
    }
    view = world.get(SellerView, anna.id)
    assert view is not None and view.tallies == notification["tallies"]


def test_redelivery_never_double_counts(world: Session, ctx: StageContext) -> None:
    anna = staff(world, "anna")
    message = call("t-dup", "2026-11-23T09:00:00+02:00")
    ingest(world, ctx, message)
    assert ingest_call(world, ctx, message).outcome == "duplicate"
    ingest(world, ctx, {**message, "note": "a later update of the same call", "sequence": 2})
    refresh_seller(world, ctx, anna.id)
    assert tallies(world, anna.id) == {("crm_event", "2026-W48"): 1, ("crm_event", "2026-11"): 1}


def test_sunday_late_evening_and_monday_just_after_midnight(
    world: Session, ctx: StageContext
) -> None:
    anna = staff(world, "anna")
    ingest(
        world,
        ctx,
        call("t-sun", "2026-11-29T23:30:00+02:00"),
        call("t-mon", "2026-11-30T00:30:00+02:00"),
    )
    refresh_seller(world, ctx, anna.id)
    assert tallies(world, anna.id) == {
        ("crm_event", "2026-W48"): 1,
        ("crm_event", "2026-W49"): 1,
        ("crm_event", "2026-11"): 2,
    }


def test_a_utc_time_counts_in_the_sellers_local_week(world: Session, ctx: StageContext) -> None:
    anna = staff(world, "anna")
    # Sunday 22:30 UTC is already Monday 00:30 in Helsinki.
    ingest(world, ctx, call("t-utc", "2026-11-29T22:30:00Z"))
    refresh_seller(world, ctx, anna.id)
    assert tallies(world, anna.id) == {("crm_event", "2026-W49"): 1, ("crm_event", "2026-11"): 1}


def test_a_utc_time_at_month_end_counts_in_the_local_month(
    world: Session, ctx: StageContext
) -> None:
    anna = staff(world, "anna")
    # 30 November 22:30 UTC is 1 December 00:30 in Helsinki.
    ingest(world, ctx, call("t-month", "2026-11-30T22:30:00+00:00"))
    refresh_seller(world, ctx, anna.id)
    assert tallies(world, anna.id) == {("crm_event", "2026-W49"): 1, ("crm_event", "2026-12"): 1}


def test_the_sellers_own_time_zone_decides(world: Session, ctx: StageContext) -> None:
    ingest_party(
        world,
        ctx,
        {
            "schema": "crm.party/1",
            "source_system": "erp",
            "kind": "staff",
            "username": "sven",
            "name": "Sven Berg",
            "email": "sven.berg@myyntitalo.fi",
            "role": "seller",
            "time_zone": "Europe/Stockholm",
        },
    )
    sven = staff(world, "sven")
    # Monday 00:30 in Helsinki is still Sunday 23:30 in Stockholm.
    ingest(world, ctx, call("t-sven", "2026-11-30T00:30:00+02:00", agent="sven"))
    refresh_seller(world, ctx, sven.id)
    assert tallies(world, sven.id) == {("crm_event", "2026-W48"): 1, ("crm_event", "2026-11"): 1}


def test_a_seller_moving_to_another_zone_is_recounted(world: Session, ctx: StageContext) -> None:
    staff_message = {
        "schema": "crm.party/1",
        "source_system": "erp",
        "kind": "staff",
        "username": "stina",
        "name": "Stina Berg",
        "email": "stina.berg@myyntitalo.fi",
        "role": "seller",
    }
    ingest_party(world, ctx, staff_message)
    stina = staff(world, "stina")
    ingest(world, ctx, call("t-stina", "2026-11-30T00:30:00+02:00", agent="stina"))
    assert tallies(world, stina.id) == {("crm_event", "2026-W49"): 1, ("crm_event", "2026-11"): 1}
    # She moves to Stockholm, where that call was still on Sunday: her counts move with her.
    moved = ingest_party(world, ctx, {**staff_message, "time_zone": "Europe/Stockholm"})
    assert "tallies recounted in Europe/Stockholm" in moved.detail
    assert moved.sellers_to_refresh == {stina.id}
    assert tallies(world, stina.id) == {("crm_event", "2026-W48"): 1, ("crm_event", "2026-11"): 1}
    assert reconcile(world, ctx).drift == 0


def test_a_late_event_counts_in_its_own_period(world: Session, ctx: StageContext) -> None:
    anna = staff(world, "anna")
    ingest(world, ctx, call("t-now", "2026-11-25T09:00:00+02:00"))
    refresh_seller(world, ctx, anna.id)
    ingest(world, ctx, call("t-late", "2026-10-14T09:00:00+03:00"))  # arrives weeks later
    refresh_seller(world, ctx, anna.id)
    assert tallies(world, anna.id) == {
        ("crm_event", "2026-W48"): 1,
        ("crm_event", "2026-11"): 1,
        ("crm_event", "2026-W42"): 1,
        ("crm_event", "2026-10"): 1,
    }


def test_year_end_event_counts_in_week_53(world: Session, ctx: StageContext) -> None:
    anna = staff(world, "anna")
    ingest(
        world,
        ctx,
        call("t-1231", "2026-12-31T12:00:00+02:00"),
        call("t-0104", "2027-01-04T12:00:00+02:00"),
    )
    refresh_seller(world, ctx, anna.id)
    assert tallies(world, anna.id) == {
        ("crm_event", "2026-W53"): 1,
        ("crm_event", "2026-12"): 1,
        ("crm_event", "2027-W01"): 1,
        ("crm_event", "2027-01"): 1,
    }


def test_moving_an_event_to_another_category_moves_its_count(
    world: Session, ctx: StageContext
) -> None:
    anna = staff(world, "anna")
    first = call("t-move", "2026-11-24T09:00:00+02:00", sequence=1)
    ingest(world, ctx, first)
    refresh_seller(world, ctx, anna.id)
    assert tallies(world, anna.id) == {("crm_event", "2026-W48"): 1, ("crm_event", "2026-11"): 1}
    ingest(world, ctx, {**first, "sequence": 2, "category": "sales_action"})
    event = world.scalar(select(CrmEvent).where(CrmEvent.source_id == "t-move"))
    assert event is not None and event.category_code == "sales_action"
    refresh_seller(world, ctx, anna.id)
    assert tallies(world, anna.id) == {
        ("sales_action", "2026-W48"): 1,
        ("sales_action", "2026-11"): 1,
    }


# -- periods ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("moment", "week", "month"),
    [
        (datetime(2026, 11, 29, 23, 30, tzinfo=HELSINKI), "2026-W48", "2026-11"),
        (datetime(2026, 11, 30, 0, 30, tzinfo=HELSINKI), "2026-W49", "2026-11"),
        (datetime(2026, 11, 29, 22, 30, tzinfo=UTC), "2026-W49", "2026-11"),
        (datetime(2026, 12, 31, 12, 0, tzinfo=HELSINKI), "2026-W53", "2026-12"),
        (datetime(2027, 1, 1, 12, 0, tzinfo=HELSINKI), "2026-W53", "2027-01"),
        (datetime(2027, 1, 3, 23, 59, tzinfo=HELSINKI), "2026-W53", "2027-01"),
        (datetime(2027, 1, 4, 0, 0, tzinfo=HELSINKI), "2027-W01", "2027-01"),
        (datetime(2026, 12, 31, 22, 30, tzinfo=UTC), "2026-W53", "2027-01"),
    ],
)
def test_period_keys(moment: datetime, week: str, month: str) -> None:
    assert period_keys(moment, HELSINKI) == (week, month)
    assert day_keys(moment.astimezone(HELSINKI).date()) == (week, month)


@pytest.mark.parametrize(
    "day",
    [date(2, 1, 1), date(999, 5, 1), date(999, 12, 31), date(1000, 1, 1), date(9998, 12, 31)],
)
def test_every_storable_year_has_periods_that_name_it(day: date) -> None:
    # Events are accepted from the year 2 on: their tally periods must be ones a view, a
    # report and the recount can name again (four-digit years, as the periods are parsed).
    week, month = day_keys(day)
    for period in (week, month):
        first, last = period_dates(period)
        assert first <= day <= last, period
    assert (week[:4], month[:4]) == (f"{day.isocalendar()[0]:04d}", f"{day.year:04d}")


def test_week_53_dates_and_bounds() -> None:
    assert period_dates("2026-W53") == (date(2026, 12, 28), date(2027, 1, 3))
    assert period_dates("2027-W01") == (date(2027, 1, 4), date(2027, 1, 10))
    assert period_dates("2026-12") == (date(2026, 12, 1), date(2026, 12, 31))
    assert period_dates("2028-02") == (date(2028, 2, 1), date(2028, 2, 29))
    start, end = period_bounds("2026-W49", HELSINKI)
    assert start == datetime(2026, 11, 29, 22, 0, tzinfo=UTC)
    assert end == datetime(2026, 12, 6, 22, 0, tzinfo=UTC)


def test_month_bounds_across_daylight_saving() -> None:
    start, end = period_bounds("2026-10", HELSINKI)
    assert start == datetime(2026, 9, 30, 21, 0, tzinfo=UTC)  # summer time, +03:00
    assert end == datetime(2026, 10, 31, 22, 0, tzinfo=UTC)  # winter time, +02:00


@pytest.mark.parametrize("bad", ["2026-W", "2026/11", "W48", "2026-13", "2026-W54"])
def test_bad_periods_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        period_dates(bad)


# -- reconcile ------------------------------------------------------------------------------------


def test_reconcile_finds_no_drift_and_repairs_a_corrupted_tally(
    world: Session, ctx: StageContext
) -> None:
    anna = staff(world, "anna")
    ingest(
        world,
        ctx,
        call("r-1", "2026-11-23T09:00:00+02:00"),
        call("r-2", "2026-11-24T09:00:00+02:00", category="sales_action"),
        call("r-3", "2026-11-24T10:00:00+02:00", agent="mikko"),
    )
    refresh_all(world, ctx)
    clean = reconcile(world, ctx)
    assert clean.drift == 0
    assert clean.keys_checked >= 6

    world.execute(
        update(Tally)
        .where(
            Tally.seller_id == anna.id,
            Tally.category_code == "crm_event",
            Tally.period == "2026-W48",
        )
        .values(count=7)
    )
    world.expire_all()
    broken = reconcile(world, ctx)
    assert broken.drift == 1
    assert broken.details == [
        {
            "seller_id": anna.id,
            "seller": "anna",
            "category": "crm_event",
            "period": "2026-W48",
            "stored": 7,
            "expected": 1,
        }
    ]
    world.expire_all()
    assert tallies(world, anna.id)[("crm_event", "2026-W48")] == 1
    assert reconcile(world, ctx).drift == 0


def test_reconcile_after_moves_and_cancellations(world: Session, ctx: StageContext) -> None:
    first = call("r-move", "2026-11-24T09:00:00+02:00", sequence=1)
    ingest(world, ctx, first, call("r-other", "2026-11-26T09:00:00+02:00"))
    refresh_all(world, ctx)
    moved = {"sequence": 2, "category": "sales_action", "started_at": "2026-12-01T09:00:00+02:00"}
    ingest(world, ctx, {**first, **moved})
    refresh_all(world, ctx)
    visit = load_example("visits/visit-with-memo.json")
    ingest_visit(world, ctx, visit)
    refresh_all(world, ctx)
    later = StageContext(ctx.settings, task_id="cancel-delivery")
    ingest_visit(world, later, {**visit, "cancelled": True})
    refresh_all(world, ctx)
    run = reconcile(world, ctx)
    assert run.drift == 0, run.details
    anna = staff(world, "anna")
    assert tallies(world, anna.id) == {
        ("crm_event", "2026-W48"): 1,
        ("crm_event", "2026-11"): 1,
        ("sales_action", "2026-W49"): 1,
        ("sales_action", "2026-12"): 1,
    }


# -- seller cards ---------------------------------------------------------------------------------


def test_card_counts_equal_the_listed_events(world: Session, ctx: StageContext) -> None:
    anna = staff(world, "anna")
    ingest(
        world,
        ctx,
        call("c-1", "2026-11-23T09:00:00+02:00"),
        call("c-2", "2026-11-29T23:30:00+02:00"),
        call("c-3", "2026-11-10T09:00:00+02:00"),
        call("c-4", "2026-11-30T00:30:00+02:00"),  # next week
        call("c-5", "2026-11-25T09:00:00+02:00", category="sales_action"),
        call("c-6", "2026-10-30T09:00:00+02:00", category="sales_action"),  # last month
    )
    refresh_seller(world, ctx, anna.id)
    now = datetime(2026, 11, 26, 12, 0, tzinfo=HELSINKI)
    cards = {c["category"]: c for c in seller_cards(world, anna, now=now)}
    assert set(cards) == {"crm_event", "lead", "sales_action", "customer_visit"}
    for card in cards.values():
        assert card["count_week"] == sum(1 for e in card["events"] if e["in_week"])
        assert card["count_month"] == sum(1 for e in card["events"] if e["in_month"])
        assert all(e["in_week"] or e["in_month"] for e in card["events"])
        # The card and the tallies come from the same stored events.
        for period, key in ((card["week"], "count_week"), (card["month"], "count_month")):
            assert tallies(world, anna.id).get((card["category"], period), 0) == card[key]
    assert cards["crm_event"]["week"] == "2026-W48"
    assert (cards["crm_event"]["count_week"], cards["crm_event"]["count_month"]) == (2, 4)
    assert (cards["sales_action"]["count_week"], cards["sales_action"]["count_month"]) == (1, 1)
    assert cards["crm_event"]["target"] is None
    target = cards["sales_action"]["target"]
    assert (target["weekly"], target["monthly"]) == (None, None)
    assert target["week"]["pace"] is None and target["month"]["actual"] == 1


def test_card_week_spanning_two_months(world: Session, ctx: StageContext) -> None:
    anna = staff(world, "anna")
    ingest(
        world,
        ctx,
        call("m-1", "2026-11-30T09:00:00+02:00"),  # W49, November
        call("m-2", "2026-12-01T09:00:00+02:00"),  # W49, December
        call("m-3", "2026-12-20T09:00:00+02:00"),  # December, a later week
    )
    now = datetime(2026, 12, 2, 12, 0, tzinfo=HELSINKI)
    card = next(c for c in seller_cards(world, anna, now=now) if c["category"] == "crm_event")
    assert (card["week"], card["month"]) == ("2026-W49", "2026-12")
    listed = {e["id"]: (e["in_week"], e["in_month"]) for e in card["events"]}
    assert sorted(listed.values()) == [(False, True), (True, False), (True, True)]
    assert (card["count_week"], card["count_month"]) == (2, 2)


def test_cancelled_and_other_sellers_events_are_not_on_the_card(
    world: Session, ctx: StageContext
) -> None:
    anna = staff(world, "anna")
    ingest(
        world,
        ctx,
        call("o-1", "2026-11-24T09:00:00+02:00"),
        call("o-2", "2026-11-24T10:00:00+02:00", agent="mikko"),
    )
    now = datetime(2026, 11, 26, 12, 0, tzinfo=HELSINKI)
    card = next(c for c in seller_cards(world, anna, now=now) if c["category"] == "crm_event")
    assert card["count_week"] == 1
    assert len(card["events"]) == 1


# -- targets -------------------------------------------------------------------------------------


@pytest.mark.parametrize("category", ["crm_event", "lead"])
def test_no_target_on_a_category_without_sales_target(world: Session, category: str) -> None:
    with pytest.raises(BadInput) as caught:
        set_target(world, "anna", category, "weekly", 5, date(2026, 11, 2))
    assert category in caught.value.reason


@pytest.mark.parametrize(
    ("username", "category", "kind", "value"),
    [
        ("nobody", "sales_action", "weekly", 5),
        ("anna", "no_such_category", "weekly", 5),
        ("anna", "sales_action", "daily", 5),
        ("anna", "sales_action", "weekly", -1),
    ],
)
def test_set_target_refuses_bad_input(
    world: Session, username: str, category: str, kind: str, value: int
) -> None:
    with pytest.raises(BadInput):
        set_target(world, username, category, kind, value, date(2026, 11, 2))


def test_a_target_changed_mid_month_keeps_the_earlier_weeks(
    world: Session, ctx: StageContext
) -> None:
    anna = staff(world, "anna")
    assert set_target(world, "anna", "sales_action", "weekly", 5, date(2026, 11, 2)) == {anna.id}
    set_target(world, "anna", "sales_action", "weekly", 8, date(2026, 11, 18))  # a Wednesday
    set_target(world, "anna", "sales_action", "monthly", 20, date(2026, 10, 1))
    set_target(world, "anna", "sales_action", "monthly", 30, date(2026, 11, 15))
    ingest(
        world,
        ctx,
        call("g-1", "2026-11-11T09:00:00+02:00", category="sales_action"),
        call("g-2", "2026-11-12T09:00:00+02:00", category="sales_action"),
    )
    refresh_seller(world, ctx, anna.id)

    def progress(period: str) -> dict[str, Any]:
        rows = targets_progress(world, seller="anna", period=period)
        (row,) = [r for r in rows if r["category"] == "sales_action"]
        return row

    assert progress("2026-W44")["target"] is None  # before any target
    assert progress("2026-W45")["target"] == 5
    w46 = progress("2026-W46")
    assert (w46["target"], w46["actual"], w46["period"]) == (5, 2, "2026-W46")
    assert progress("2026-W47")["target"] == 8
    assert progress("2026-W48")["target"] == 8
    assert progress("2026-10")["target"] == 20
    assert progress("2026-11")["target"] == 30
    assert progress("2026-11")["actual"] == 2
    assert target_in_force(world, anna.id, "sales_action", "2026-W46") == 5
    assert target_in_force(world, anna.id, "customer_visit", "2026-W46") is None

    # Setting the same start date again replaces that target, not the earlier one.
    set_target(world, "anna", "sales_action", "weekly", 9, date(2026, 11, 18))
    assert progress("2026-W47")["target"] == 9
    assert progress("2026-W46")["target"] == 5


def test_targets_progress_rows_for_every_target_category(world: Session, ctx: StageContext) -> None:
    rows = targets_progress(world, seller="anna", period="2026-W48")
    assert {r["category"] for r in rows} == {"sales_action", "customer_visit"}
    for row in rows:
        assert row["seller"] == "anna"
        assert row["period"] == "2026-W48"
        assert row["target"] is None
        assert row["actual"] == 0


# -- internal calls -------------------------------------------------------------------------------


def internal_call(call_id: str, started_at: str) -> dict[str, Any]:
    """Anna (extension 201) rings Mikko's mobile: a call between our own people."""
    return call(call_id, started_at, to="050 333 4444")


def counted_now(db: Session, anna: Staff) -> tuple[dict[tuple[str, str], int], list[int], int]:
    """Anna's tallies, the events her cards list, and November's crm_event statistic."""
    cards = seller_cards(db, anna, now=datetime(2026, 11, 25, 12, tzinfo=UTC))
    listed = sorted(e["id"] for card in cards for e in card["events"])
    rows = statistics(db, "category", "2026-11", HELSINKI)
    return (
        tallies(db, anna.id),
        listed,
        next(r["events"] for r in rows if r["category"] == "crm_event"),
    )


def test_internal_calls_are_kept_marked_and_left_out_of_what_is_counted(
    world: Session, ctx: StageContext
) -> None:
    anna = staff(world, "anna")
    ingest(
        world,
        ctx,
        call("i-1", "2026-11-24T09:00:00+02:00"),
        internal_call("i-2", "2026-11-24T10:00:00+02:00"),
    )
    customer_call, internal = (
        world.scalar(select(CrmEvent).where(CrmEvent.source_id == i)) for i in ("i-1", "i-2")
    )
    assert customer_call is not None and internal is not None
    assert (internal.link_state, internal.seller_id) == ("internal", anna.id)

    counts, listed, statistic = counted_now(world, anna)
    assert counts == {("crm_event", "2026-W48"): 1, ("crm_event", "2026-11"): 1}
    assert listed == [customer_call.id]
    assert statistic == 1
    assert reconcile(world, ctx).drift == 0


def test_internal_calls_count_where_the_setting_says_so(
    world: Session, ctx: StageContext, engine: Engine
) -> None:
    assert create_session_factory(engine, True)().info[COUNT_INTERNAL_CALLS] is True
    assert load_settings({"CRM_COUNT_INTERNAL_CALLS": "true"}).count_internal_calls is True
    world.info[COUNT_INTERNAL_CALLS] = True  # what the session factory of such a setting gives
    anna = staff(world, "anna")
    ingest(
        world,
        ctx,
        call("i-3", "2026-11-24T09:00:00+02:00"),
        internal_call("i-4", "2026-11-24T10:00:00+02:00"),
    )
    counts, listed, statistic = counted_now(world, anna)
    assert counts == {("crm_event", "2026-W48"): 2, ("crm_event", "2026-11"): 2}
    assert len(listed) == 2 and statistic == 2
    assert reconcile(world, ctx).drift == 0

    # Switched off again: the reconcile takes them out of the tallies it finds them in.
    world.info[COUNT_INTERNAL_CALLS] = False
    assert reconcile(world, ctx).drift == 2
    assert counted_now(world, anna)[0] == {
        ("crm_event", "2026-W48"): 1,
        ("crm_event", "2026-11"): 1,
    }


def test_a_target_replaced_on_the_same_start_date_leaves_a_trace(world: Session) -> None:
    monday = date(2026, 11, 2)
    set_target(world, "anna", "sales_action", "weekly", 5, monday, changed_by="cli:helena")
    set_target(world, "anna", "sales_action", "weekly", 5, monday, changed_by="cli:helena")
    set_target(world, "anna", "sales_action", "weekly", 7, monday, source_system="erp")
    set_target(world, "anna", "sales_action", "weekly", 8, date(2026, 11, 9), source_system="erp")
    changes = target_changes(world, "anna")
    assert [
        (c["valid_from"], c["old_value"], c["new_value"], c["changed_by"]) for c in changes
    ] == [
        ("2026-11-02", None, 5, "cli:helena"),  # set again with the same value: no change
        ("2026-11-02", 5, 7, "erp"),
        ("2026-11-09", None, 8, "erp"),
    ]
    assert [(t["valid_from"], t["value"]) for t in target_history(world, "anna")] == [
        ("2026-11-02", 7),
        ("2026-11-09", 8),
    ]
