"""Which remote sets go, after each successful run.

``backup_retain`` is a duration as the seed's ``date -d`` read it: ``<n> <unit>`` with unit
day, week, fortnight, month or year (plural or not, any case): "8 weeks", "30 days",
"3 months", "1 year". Anything else is refused with a message, before the run does anything.

Deleted:

* every complete set whose full (its date) is older than ``today - backup_retain`` (months and
  years by the calendar: 3 months before 2026-05-31 is 2026-02-28), except the newest complete
  set, which is never deleted, however old;
* every incomplete set (no manifest for run 0: an interrupted full, never restorable; retention
  runs right after a complete run, under the lock, so no run is writing one);
* inside the sets kept, the objects of runs without a manifest (an interrupted increment; the
  next run reuses its number and rewrites them, this removes what it did not rewrite).

A set goes manifests first, so a half-deleted set looks incomplete, never complete.
"""

from __future__ import annotations

import calendar
import datetime
import re
from collections.abc import Callable

from policy.backup import BackupError
from policy.backup.layout import SetListing
from policy.backup.store import Store

_DURATION = re.compile(r"\s*(\d{1,4})\s*(day|week|fortnight|month|year)s?\s*", re.IGNORECASE)


def cutoff(today: datetime.date, retain: str) -> datetime.date:
    """Sets whose full is before this date are past retention."""
    m = _DURATION.fullmatch(retain)
    if m is None:
        raise BackupError(
            f"backup_retain {retain!r} is not a duration like '8 weeks', '30 days', "
            "'3 months' or '1 year'"
        )
    n, unit = int(m[1]), m[2].lower()
    if unit in ("day", "week", "fortnight"):
        return today - datetime.timedelta(days=n * {"day": 1, "week": 7, "fortnight": 14}[unit])
    months = n * (12 if unit == "year" else 1)
    year, month = divmod(today.year * 12 + today.month - 1 - months, 12)
    if year < 1:
        return datetime.date.min
    day = min(today.day, calendar.monthrange(year, month + 1)[1])
    return datetime.date(year, month + 1, day)


def plan(sets: dict[str, SetListing], before: datetime.date) -> tuple[list[str], list[str]]:
    """(sets to delete, leftover objects to delete in the sets kept)."""
    complete = [name for name, s in sets.items() if s.complete]
    newest_complete = max(complete, default=None)
    doomed = []
    for name, s in sets.items():
        if not s.complete or (
            name != newest_complete and datetime.date.fromisoformat(name) < before
        ):
            doomed.append(name)
    leftovers = [
        key
        for name, s in sets.items()
        if name not in doomed and s.complete
        for key in s.leftovers()
    ]
    return sorted(doomed), leftovers


def apply(
    store: Store, sets: dict[str, SetListing], before: datetime.date, log: Callable[[str], None]
) -> int:
    """Delete what ``plan`` says; returns the number of objects deleted."""
    doomed, leftovers = plan(sets, before)
    deleted = 0
    for name in doomed:
        s = sets[name]
        manifests = sorted((k for k in s.objects if k.endswith(".json")), reverse=True)
        for key in [*manifests, *sorted(set(s.objects) - set(manifests))]:
            store.delete(key)
            deleted += 1
        state = "complete" if s.complete else "incomplete"
        log(f"retention: deleted {state} set {name} ({len(s.objects)} objects, {s.size} bytes)")
    for key in leftovers:
        store.delete(key)
        deleted += 1
    if leftovers:
        log(f"retention: deleted {len(leftovers)} objects of interrupted runs")
    return deleted
