"""Schedule expressions: cron fields (values, names, ranges, steps, lists, the day-of-month/day-of-week rule),
rates, and the next fire time."""

from __future__ import annotations

import datetime as dt

import pytest

from hackboot.functions import schedule
from hackboot.functions.schedule import Cron, InvalidSchedule, Rate, parse


def at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC)


def fires(expression: str, start: str, n: int) -> list[str]:
    s, moment, out = parse(expression), at(start), []
    for _ in range(n):
        moment = s.next_after(moment)
        out.append(moment.strftime("%Y-%m-%d %H:%M %a"))
    return out


def test_fields_values_ranges_steps_lists_and_names() -> None:
    c = parse("*/15 9-17/4 1,15 jan-mar,DEC mon-fri")
    assert isinstance(c, Cron)
    assert c.minutes == {0, 15, 30, 45} and c.hours == {9, 13, 17} and c.days == {1, 15}
    assert c.months == {1, 2, 3, 12} and c.weekdays == {1, 2, 3, 4, 5}
    assert parse("5/20 * * * *").minutes == {5, 25, 45}  # a/n: from a to the end
    assert parse("0 0 * * 7").weekdays == {0} == parse("0 0 * * sun").weekdays  # 7 and 0 are Sunday
    assert parse("0 0 * * 5-7").weekdays == {5, 6, 0}


def test_every_minute_and_hourly_and_daily() -> None:
    assert fires("* * * * *", "2026-12-01T10:00:30", 3) == ["2026-12-01 10:01 Tue", "2026-12-01 10:02 Tue",
                                                             "2026-12-01 10:03 Tue"]
    assert fires("0 * * * *", "2026-12-01T10:00:00", 2) == ["2026-12-01 11:00 Tue", "2026-12-01 12:00 Tue"]
    assert fires("30 2 * * *", "2026-12-31T03:00:00", 2) == ["2027-01-01 02:30 Fri", "2027-01-02 02:30 Sat"]


def test_next_is_strictly_after_even_on_a_matching_minute() -> None:
    assert fires("*/5 * * * *", "2026-12-01T10:05:00", 1) == ["2026-12-01 10:10 Tue"]
    assert fires("*/5 * * * *", "2026-12-01T10:04:59.999", 1) == ["2026-12-01 10:05 Tue"]


def test_weekdays_months_and_leap_days() -> None:
    assert fires("0 8 * * mon-fri", "2026-12-04T09:00:00", 2) == ["2026-12-07 08:00 Mon", "2026-12-08 08:00 Tue"]
    assert fires("0 0 1 */3 *", "2026-12-01T00:00:00", 2) == ["2027-01-01 00:00 Fri", "2027-04-01 00:00 Thu"]
    assert fires("0 12 29 feb *", "2026-03-01T00:00:00", 1) == ["2028-02-29 12:00 Tue"]
    assert fires("0 0 31 * *", "2026-12-31T00:00:00", 2) == ["2027-01-31 00:00 Sun", "2027-03-31 00:00 Wed"]


def test_restricted_day_of_month_or_day_of_week_as_in_vixie_cron() -> None:
    # both restricted: either matches (the 13th, or any Friday)
    assert fires("0 0 13 * fri", "2026-12-01T00:00:00", 3) == ["2026-12-04 00:00 Fri", "2026-12-11 00:00 Fri",
                                                               "2026-12-13 00:00 Sun"]
    # a field starting with "*" does not restrict: every other day that is a Monday
    assert fires("0 0 */2 * mon", "2026-12-01T00:00:00", 2) == ["2026-12-07 00:00 Mon", "2026-12-21 00:00 Mon"]


def test_rates() -> None:
    r = parse("rate(5 minutes)")
    assert isinstance(r, Rate) and r.period_s == 300
    assert r.next_after(at("2026-12-01T10:00:00.5")) == at("2026-12-01T10:05:00")
    assert parse("rate(1 minute)").period_s == 60 and parse("rate(2 hours)").period_s == 7200
    assert parse("rate(1 day)").period_s == 86400
    assert schedule.next_fire("rate(1 hour)", at("2026-12-01T10:00:00")) == at("2026-12-01T11:00:00")


@pytest.mark.parametrize("bad", [
    "", "* * * *", "* * * * * *", "60 * * * *", "* 24 * * *", "* * 0 * *", "* * 32 * *", "* * * 13 *",
    "* * * * 8", "*/0 * * * *", "5-1 * * * *", "a * * * *", "* * * foo *", "1,,2 * * * *", "0 0 30 feb *",
    "0 0 31 apr,jun *", "rate(0 minutes)", "rate(5 minute)", "rate(1 minutes)", "rate(5 weeks)", "rate(5)",
    "rate(367 days)", "x" * 300,
])
def test_invalid_expressions_say_why(bad: str) -> None:
    with pytest.raises(InvalidSchedule) as err:
        parse(bad)
    assert str(err.value)
