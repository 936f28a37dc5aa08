"""When a manager's report is due, and for which period, in the manager's own time zone."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from config.settings import ConfigError, Settings, load_settings
from tasks.reports import closed_period, due_period, previous_period

HELSINKI = ZoneInfo("Europe/Helsinki")
LONDON = ZoneInfo("Europe/London")
DEFAULTS = Settings()


@pytest.mark.parametrize(
    ("moment", "due"),
    [
        # Sunday 23:30 in Helsinki: still week 48; its report (of week 47) went out on Monday.
        (datetime(2026, 11, 29, 23, 30, tzinfo=HELSINKI), "2026-W47"),
        # Monday 00:30 in Helsinki: week 49 has begun, but its send time (07:00) has not come.
        (datetime(2026, 11, 30, 0, 30, tzinfo=HELSINKI), None),
        # Sunday 22:30 UTC is already Monday 00:30 in Helsinki: nothing due yet.
        (datetime(2026, 11, 29, 22, 30, tzinfo=UTC), None),
        (datetime(2026, 11, 30, 6, 59, tzinfo=HELSINKI), None),
        # Monday 07:00 in Helsinki (05:00 UTC): the week just closed is due.
        (datetime(2026, 11, 30, 5, 0, tzinfo=UTC), "2026-W48"),
        (datetime(2026, 12, 2, 15, 0, tzinfo=HELSINKI), "2026-W48"),
        # Year end: 2026 has a week 53 (28 Dec - 3 Jan), reported on Monday 4 January 2027.
        (datetime(2027, 1, 3, 23, 30, tzinfo=HELSINKI), "2026-W52"),
        (datetime(2027, 1, 4, 7, 0, tzinfo=HELSINKI), "2026-W53"),
        (datetime(2027, 1, 11, 7, 0, tzinfo=HELSINKI), "2027-W01"),
        # Summer time begins on 28 March 2027: Monday 07:00 is 04:00 UTC.
        (datetime(2027, 3, 29, 3, 59, tzinfo=UTC), None),
        (datetime(2027, 3, 29, 4, 0, tzinfo=UTC), "2027-W12"),
    ],
)
def test_weekly_report_is_due_from_monday_0700_in_helsinki(moment: datetime, due: str) -> None:
    assert due_period("weekly", moment, HELSINKI, DEFAULTS) == due


@pytest.mark.parametrize(
    ("moment", "due"),
    [
        (datetime(2026, 11, 30, 23, 30, tzinfo=HELSINKI), "2026-10"),
        # 30 November 22:30 UTC is 1 December 00:30 in Helsinki: before 07:00.
        (datetime(2026, 11, 30, 22, 30, tzinfo=UTC), None),
        (datetime(2026, 12, 1, 7, 0, tzinfo=HELSINKI), "2026-11"),
        (datetime(2027, 1, 1, 6, 59, tzinfo=HELSINKI), None),
        (datetime(2027, 1, 1, 7, 0, tzinfo=HELSINKI), "2026-12"),
        (datetime(2027, 1, 20, 12, 0, tzinfo=HELSINKI), "2026-12"),
    ],
)
def test_monthly_report_is_due_from_the_first_at_0700(moment: datetime, due: str) -> None:
    assert due_period("monthly", moment, HELSINKI, DEFAULTS) == due


def test_each_manager_gets_the_report_at_their_own_local_time() -> None:
    helsinki_seven = datetime(2026, 11, 30, 5, 0, tzinfo=UTC)  # 07:00 Helsinki, 05:00 London
    assert due_period("weekly", helsinki_seven, HELSINKI, DEFAULTS) == "2026-W48"
    assert due_period("weekly", helsinki_seven, LONDON, DEFAULTS) is None
    london_seven = datetime(2026, 11, 30, 7, 0, tzinfo=UTC)
    assert due_period("weekly", london_seven, LONDON, DEFAULTS) == "2026-W48"


def test_the_schedule_is_configurable() -> None:
    settings = load_settings({"CRM_WEEKLY_REPORT_AT": "fri 16:30", "CRM_MONTHLY_REPORT_AT": "off"})
    # The week just closed is reported on the Friday of the following week at 16:30.
    thursday = datetime(2026, 12, 3, 12, 0, tzinfo=HELSINKI)
    friday = datetime(2026, 12, 4, 16, 30, tzinfo=HELSINKI)
    assert due_period("weekly", thursday, HELSINKI, settings) is None
    assert due_period("weekly", friday.replace(minute=29), HELSINKI, settings) is None
    assert due_period("weekly", friday, HELSINKI, settings) == "2026-W48"
    assert due_period("monthly", friday, HELSINKI, settings) is None  # off


def test_a_bad_schedule_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"CRM_WEEKLY_REPORT_AT": "someday 7", "CRM_MONTHLY_REPORT_AT": "31 07:00"})
    assert "CRM_WEEKLY_REPORT_AT" in str(caught.value)
    assert "CRM_MONTHLY_REPORT_AT: expected a day of the month 1-28" in str(caught.value)


@pytest.mark.parametrize(
    ("period", "previous"),
    [
        ("2027-W01", "2026-W53"),
        ("2026-W53", "2026-W52"),
        ("2026-W01", "2025-W52"),
        ("2027-01", "2026-12"),
        ("2026-03", "2026-02"),
    ],
)
def test_previous_period(period: str, previous: str) -> None:
    assert previous_period(period) == previous


def test_closed_and_current_periods_across_the_year_end() -> None:
    moment = datetime(2027, 1, 4, 9, 0, tzinfo=HELSINKI)
    assert closed_period("weekly", moment, HELSINKI) == ("2026-W53", "2027-W01")
    assert closed_period("monthly", moment, HELSINKI) == ("2026-12", "2027-01")
