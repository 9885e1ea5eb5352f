"""Retention policies: which snapshots ``snapshot forget`` keeps, and why.

Pure: given snapshot roots and a policy it decides, for every snapshot, keep or forget, with
the rules that keep it. It reads and deletes nothing (the CLI deletes what is to be forgotten
through ``gc.delete_snapshots``, which also frees the blocks no snapshot needs any more).

The rules, in the spirit of restic's ``forget`` and borg's ``prune``:

- Each disk's snapshots form a series of their own, judged newest first; one disk's many
  snapshots never push out another's.
- ``last N`` keeps the N newest.
- ``hourly/daily/weekly/monthly/yearly N`` keep the newest snapshot of each of the N most
  recent hours, days, ISO weeks, months or years *that have a snapshot*, in local time. A
  period without one does not count: ``daily 30`` on a disk snapshotted every other day
  reaches back 60 days. That is what a cloud console's "daily, kept 30 days" means for a
  machine that was off some days: thirty restore points, not fewer.
- ``within D`` keeps every snapshot taken within D before the disk's *newest* snapshot, not
  before now: when snapshots stop being taken (a machine off, a broken cron job) the last ones
  are not forgotten one by one as time passes.
- ``tags`` keeps every snapshot that carries one of them.
- A snapshot kept for any reason keeps every other member of its consistency group, so a group
  can always be restored whole.
- ``protected`` snapshots (the base or parent of a disk being served) are kept, with the reason
  the caller gives.
- A snapshot whose creation time cannot be read is kept: nothing is forgotten on a guess.

A policy without any rule keeps nothing and is refused by the CLI: forgetting everything is
``snapshot delete``'s job.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, tzinfo

from snapfs.errors import UsageError
from snapfs.format.manifest import SnapshotRoot

#: the periods a ``keep-PERIOD N`` rule counts, and how a snapshot's local time falls into one
PERIODS: dict[str, Callable[[datetime], tuple[int, ...]]] = {
    "hourly": lambda t: (t.year, t.month, t.day, t.hour),
    "daily": lambda t: (t.year, t.month, t.day),
    "weekly": lambda t: tuple(t.isocalendar())[:2],
    "monthly": lambda t: (t.year, t.month),
    "yearly": lambda t: (t.year,),
}

_DURATION_PART = re.compile(r"(\d+)([hdwmy])")
_UNITS = {"h": "hours", "d": "days", "w": "weeks", "m": "months", "y": "years"}


@dataclass(frozen=True)
class Duration:
    """A span of calendar time: months and years are calendar months and years (``1m`` back
    from March 31 is the last day of February), the rest fixed lengths."""

    years: int = 0
    months: int = 0
    weeks: int = 0
    days: int = 0
    hours: int = 0

    @classmethod
    def parse(cls, text: str) -> Duration:
        """``30d``, ``12h``, ``2w``, ``6m`` (months), ``1y``, or several at once: ``1y6m``."""
        compact = text.strip().lower()
        parts = _DURATION_PART.findall(compact)
        if not parts or "".join(n + u for n, u in parts) != compact:
            raise UsageError(f"cannot read duration {text!r}: use a number and a unit, h(ours), "
                             "d(ays), w(eeks), m(onths) or y(ears), as 30d or 1y6m")
        units = [u for _, u in parts]
        if len(set(units)) != len(units):
            raise UsageError(f"duration {text!r} names a unit twice")
        return cls(**{_UNITS[u]: int(n) for n, u in parts})

    def before(self, moment: datetime) -> datetime:
        """The moment this long before ``moment``."""
        months = moment.year * 12 + (moment.month - 1) - (self.years * 12 + self.months)
        year, month = divmod(months, 12)
        month += 1
        day = min(moment.day, calendar.monthrange(year, month)[1])
        shifted = moment.replace(year=year, month=month, day=day)
        return shifted - timedelta(weeks=self.weeks, days=self.days, hours=self.hours)

    def __str__(self) -> str:
        text = "".join(f"{getattr(self, name)}{unit}" for unit, name in
                       [("y", "years"), ("m", "months"), ("w", "weeks"), ("d", "days"),
                        ("h", "hours")] if getattr(self, name))
        return text or "0d"


@dataclass(frozen=True)
class RetentionPolicy:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within: Duration | None = None
    tags: frozenset[str] = frozenset()

    def empty(self) -> bool:
        return not (self.last or any(getattr(self, p) for p in PERIODS) or self.within
                    or self.tags)


@dataclass
class Decision:
    root: SnapshotRoot
    reasons: list[str] = field(default_factory=list)  # empty: forgotten

    @property
    def keep(self) -> bool:
        return bool(self.reasons)


def created_at(root: SnapshotRoot, tz: tzinfo | None = None) -> datetime | None:
    """When ``root`` was taken, in ``tz`` (default: local time); None if it cannot be read."""
    try:
        moment = datetime.fromisoformat(root.created)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        return None  # snapfs writes UTC with a zone; a time without one is not ours to guess
    return moment.astimezone(tz)


def decide(roots: Iterable[SnapshotRoot], policy: RetentionPolicy,
           protected: dict[str, str] | None = None, tz: tzinfo | None = None,
           ) -> list[Decision]:
    """A decision for every snapshot of ``roots``, in the order given. ``protected`` maps
    snapshot ids that must be kept to the reason; ``tz`` is the zone periods are counted in
    (default: local time)."""
    protected = protected or {}
    decisions = [Decision(r) for r in roots]
    series: dict[str, list[tuple[datetime, Decision]]] = {}
    for d in decisions:
        moment = created_at(d.root, tz)
        if moment is None:
            d.reasons.append("creation time unreadable")
        else:
            series.setdefault(d.root.disk, []).append((moment, d))
        if d.root.id in protected:
            d.reasons.append(protected[d.root.id])
        if policy.tags & set(d.root.tags):
            d.reasons.append("tag " + ",".join(sorted(policy.tags & set(d.root.tags))))
    for members in series.values():
        members.sort(key=lambda m: (m[0], m[1].root.id), reverse=True)  # newest first
        _apply_rules(members, policy)
    by_group: dict[str, list[Decision]] = {}
    for d in decisions:
        if d.root.group:
            by_group.setdefault(d.root.group, []).append(d)
    for group in by_group.values():
        if any(d.keep for d in group):
            for d in group:
                if not d.keep:
                    d.reasons.append("group")
    return decisions


def _apply_rules(members: list[tuple[datetime, Decision]], policy: RetentionPolicy) -> None:
    """One disk's snapshots, newest first."""
    for _moment, d in members[: policy.last]:
        d.reasons.append("last")
    for period, key_of in PERIODS.items():
        left: int = getattr(policy, period)
        previous: tuple[int, ...] | None = None
        for moment, d in members:
            if left <= 0:
                break
            key = key_of(moment)
            if key != previous:  # the newest snapshot of a period not seen yet
                d.reasons.append(period)
                previous = key
                left -= 1
    if policy.within is not None and members:
        cutoff = policy.within.before(members[0][0])
        for moment, d in members:
            if moment >= cutoff:
                d.reasons.append(f"within {policy.within}")
