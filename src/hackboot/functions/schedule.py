"""Schedule expressions of schedule triggers: 5-field cron and ``rate(N unit)``; when they fire next.

Pure arithmetic on UTC datetimes (no database, no clock): :func:`parse` checks an expression and gives a
:class:`Schedule` whose :meth:`Schedule.next_after` is the first fire time strictly after a moment.

Cron fields: minute (0-59), hour (0-23), day of month (1-31), month (1-12 or jan-dec), day of week (0-7 or
sun-sat; 0 and 7 are Sunday). Each field is ``*``, a value, a range ``a-b``, a step ``*/n`` or ``a-b/n`` or
``a/n``, or a comma-separated list of those. As in Vixie cron, when both day fields are restricted a day
matches if either does. Rates: ``rate(1 minute)``, ``rate(5 minutes)``, ``rate(2 hours)``, ``rate(1 day)``.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_RATE = re.compile(r"^rate\(\s*(\d{1,6})\s+(minute|minutes|hour|hours|day|days)\s*\)$")
_UNIT_S = {"minute": 60, "hour": 3600, "day": 86400}
MAX_RATE_S = 366 * 86400
# A cron expression that never matches (Feb 30) would loop forever: give up after this many years.
_SEARCH_YEARS = 5


class InvalidSchedule(ValueError):
    """The expression is not a cron expression or a rate (the message says why)."""


@dataclass(frozen=True)
class Schedule:
    expression: str

    def next_after(self, moment: dt.datetime) -> dt.datetime:
        raise NotImplementedError


@dataclass(frozen=True)
class Rate(Schedule):
    period_s: int

    def next_after(self, moment: dt.datetime) -> dt.datetime:
        """`moment` + the period (whole seconds): rates run relative to their previous fire."""
        return _utc(moment).replace(microsecond=0) + dt.timedelta(seconds=self.period_s)


@dataclass(frozen=True)
class Cron(Schedule):
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    days_restricted: bool
    weekdays_restricted: bool

    def _day_matches(self, day: dt.date) -> bool:
        dom = day.day in self.days
        dow = (day.isoweekday() % 7) in self.weekdays
        if self.days_restricted and self.weekdays_restricted:
            return dom or dow
        return dom and dow

    def next_after(self, moment: dt.datetime) -> dt.datetime:
        """The first minute strictly after `moment` that the expression matches."""
        start = _utc(moment).replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
        day = start.date()
        limit = day.replace(year=day.year + _SEARCH_YEARS) if not (day.month == 2 and day.day == 29) \
            else dt.date(day.year + _SEARCH_YEARS, 3, 1)
        first_day = True
        while day < limit:
            if day.month not in self.months:
                # jump to the first day of the next month
                day = dt.date(day.year + (day.month == 12), day.month % 12 + 1, 1)
                first_day = False
                continue
            if self._day_matches(day):
                for hour in sorted(self.hours):
                    if first_day and hour < start.hour:
                        continue
                    for minute in sorted(self.minutes):
                        if first_day and hour == start.hour and minute < start.minute:
                            continue
                        return dt.datetime(day.year, day.month, day.day, hour, minute, tzinfo=dt.UTC)
            day += dt.timedelta(days=1)
            first_day = False
        raise InvalidSchedule(f"'{self.expression}' matches no time in the next {_SEARCH_YEARS} years")


def _utc(moment: dt.datetime) -> dt.datetime:
    return moment.replace(tzinfo=dt.UTC) if moment.tzinfo is None else moment.astimezone(dt.UTC)


def _value(text: str, low: int, high: int, names: tuple[str, ...], name_base: int, field: str) -> int:
    lowered = text.lower()
    if names and lowered in names:
        return names.index(lowered) + name_base
    if not text.isdigit():
        raise InvalidSchedule(f"'{text}' is not a valid {field}")
    value = int(text)
    if not low <= value <= high:
        raise InvalidSchedule(f"{field} {value} is out of range {low}-{high}")
    return value


def _field(text: str, low: int, high: int, field: str, names: tuple[str, ...] = (),
           name_base: int = 0) -> tuple[frozenset[int], bool]:
    """The set of values a cron field allows, and whether it restricts anything (not `*`)."""
    if not text:
        raise InvalidSchedule(f"empty {field} field")
    values: set[int] = set()
    for part in text.split(","):
        base, slash, step_text = part.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) == 0:
                raise InvalidSchedule(f"'{step_text}' is not a step (a positive number) in the {field} field")
            step = int(step_text)
        if base == "*":
            first, last = low, high
        elif "-" in base:
            a, _, b = base.partition("-")
            first = _value(a, low, high, names, name_base, field)
            last = _value(b, low, high, names, name_base, field)
            if last < first:
                raise InvalidSchedule(f"the range {base} of the {field} field is empty")
        else:
            first = _value(base, low, high, names, name_base, field)
            last = high if slash else first
        values.update(range(first, last + 1, step))
    # As in Vixie cron, a field starting with "*" (even "*/2") does not restrict the other day field.
    return frozenset(values), not text.startswith("*")


def parse(expression: str) -> Schedule:
    """A cron expression (5 fields) or a rate; :class:`InvalidSchedule` otherwise."""
    text = expression.strip()
    if len(text) > 256:
        raise InvalidSchedule("a schedule expression is at most 256 characters")
    rate = _RATE.fullmatch(text)
    if rate:
        amount, unit = int(rate.group(1)), rate.group(2).rstrip("s")
        if amount == 0:
            raise InvalidSchedule("a rate is at least 1")
        if (amount == 1) != (not rate.group(2).endswith("s")):
            raise InvalidSchedule(f"write rate({amount} {unit}{'' if amount == 1 else 's'})")
        period = amount * _UNIT_S[unit]
        if period > MAX_RATE_S:
            raise InvalidSchedule("a rate is at most 366 days")
        return Rate(text, period)
    if text.startswith("rate"):
        raise InvalidSchedule(f"'{text}' is not a rate such as rate(5 minutes), rate(1 hour) or rate(2 days)")
    fields = text.split()
    if len(fields) != 5:
        raise InvalidSchedule(f"a cron expression has 5 fields (minute hour day-of-month month day-of-week), "
                              f"not {len(fields)}")
    minutes, _ = _field(fields[0], 0, 59, "minute")
    hours, _ = _field(fields[1], 0, 23, "hour")
    days, days_restricted = _field(fields[2], 1, 31, "day of month")
    months, _ = _field(fields[3], 1, 12, "month", MONTHS, 1)
    weekdays, weekdays_restricted = _field(fields[4], 0, 7, "day of week", DAYS, 0)
    if 7 in weekdays:
        weekdays = (weekdays - {7}) | {0}
    cron = Cron(text, minutes, hours, days, months, frozenset(weekdays), days_restricted, weekdays_restricted)
    cron.next_after(dt.datetime(2000, 1, 1, tzinfo=dt.UTC))  # refuses one that never matches (30 February)
    return cron


def next_fire(expression: str, after: dt.datetime) -> dt.datetime:
    return parse(expression).next_after(after)
