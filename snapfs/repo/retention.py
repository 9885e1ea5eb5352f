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
- A snapshot whose root cannot be read at all never reaches ``decide``: ``snapshot forget``
  refuses while one exists. Its disk, time and group are unknown, and judging the others without
  it could forget one it would keep (a group member it keeps, on another disk).

A policy without any rule keeps nothing and is refused by the CLI: forgetting everything is
``snapshot delete``'s job. So is a policy that would forget every snapshot of a disk (only
``tags`` can, when no snapshot carries them: a typo in a tag, most likely), as restic refuses
``forget --keep-tag`` that empties a group: ``emptied_disks`` finds them.

Policies can be stored in the repository (``snapfs policy set``: one for every disk, and one per
disk that overrides it), so that a backup job runs ``snapshot forget`` with no rules and each
disk keeps what its policy says. Stored as JSON with a format name and a version.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, tzinfo

from snapfs.errors import CorruptBlock, UsageError
from snapfs.format.manifest import SnapshotRoot
from snapfs.format.versioned import decode_versioned, encode_versioned

#: the periods a ``keep-PERIOD N`` rule counts, and how a snapshot's local time falls into one
PERIODS: dict[str, Callable[[datetime], tuple[int, ...]]] = {
    "hourly": lambda t: (t.year, t.month, t.day, t.hour),
    "daily": lambda t: (t.year, t.month, t.day),
    "weekly": lambda t: tuple(t.isocalendar())[:2],
    "monthly": lambda t: (t.year, t.month),
    "yearly": lambda t: (t.year,),
}

POLICY_FORMAT = "snapfs-retention-policy"
POLICY_VERSION = 1
#: the counted rules, in the order they are shown
COUNTS = ("last", *PERIODS)

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
        if any(len(n) > 7 for n, _ in parts):  # a million years is "everything" already
            raise UsageError(f"duration {text!r} is too long: at most 7 digits a unit")
        return cls(**{_UNITS[u]: int(n) for n, u in parts})

    def before(self, moment: datetime) -> datetime:
        """The wall-clock time this long before ``moment`` (a naive local time: a month before
        noon in winter is noon in summer, whatever the zone's offsets); ``datetime.min`` when
        that is before the calendar begins (the span takes in everything)."""
        try:
            months = moment.year * 12 + (moment.month - 1) - (self.years * 12 + self.months)
            year, month = divmod(months, 12)
            month += 1
            day = min(moment.day, calendar.monthrange(year, month)[1])
            shifted = moment.replace(year=year, month=month, day=day)
            return shifted - timedelta(weeks=self.weeks, days=self.days, hours=self.hours)
        except (ValueError, OverflowError):
            return datetime.min

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
        return not (any(getattr(self, c) for c in COUNTS) or self.within or self.tags)

    def rules(self) -> dict[str, int | str | list[str]]:
        """The rules that are set, by name (``daily``, ``within``, ``tags``, …)."""
        out: dict[str, int | str | list[str]] = {c: getattr(self, c) for c in COUNTS
                                                 if getattr(self, c)}
        if self.within is not None:
            out["within"] = str(self.within)
        if self.tags:
            out["tags"] = sorted(self.tags)
        return out

    def __str__(self) -> str:
        return ", ".join(f"{name} {','.join(v) if isinstance(v, list) else v}"
                         for name, v in self.rules().items()) or "no rules"

    def encode(self) -> bytes:
        return encode_versioned(POLICY_FORMAT, POLICY_VERSION, {"keep": self.rules()})

    @classmethod
    def decode(cls, data: bytes) -> RetentionPolicy:
        doc = decode_versioned(data, POLICY_FORMAT, POLICY_VERSION, "retention policy")
        # Strict: a policy read wrongly keeps less than it says, and forget deletes the rest.
        keep = doc.get("keep")
        malformed = CorruptBlock("retention policy has malformed rules")
        if not isinstance(keep, dict) or not keep or set(keep) - {*COUNTS, "within", "tags"}:
            raise malformed
        counts = {c: keep.get(c, 0) for c in COUNTS}
        if any(type(n) is not int or n < 0 or (c in keep and n == 0)
               for c, n in counts.items()):
            raise malformed
        within = keep.get("within")
        tags = keep.get("tags", [])
        if (within is not None and not isinstance(within, str)) or not isinstance(tags, list) \
                or not all(isinstance(t, str) for t in tags):
            raise malformed
        try:
            policy = cls(**counts, within=Duration.parse(within) if within else None,
                         tags=frozenset(tags))
        except UsageError:
            raise malformed from None
        if policy.empty():
            raise malformed
        return policy


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


def decide(roots: Iterable[SnapshotRoot],
           policy: RetentionPolicy | Mapping[str, RetentionPolicy | None],
           protected: dict[str, str] | None = None, tz: tzinfo | None = None,
           only: str | None = None) -> list[Decision]:
    """A decision for every snapshot of ``roots``, in the order given, under ``policy``: one
    for every disk, or one per disk name (a disk with None, or missing, keeps everything).
    ``protected`` maps snapshot ids that must be kept to the reason; ``tz`` is the zone periods
    are counted in (default: local time). With ``only``, the decisions for that disk's
    snapshots alone, the other disks' all kept: their groups keep members on it too."""
    protected = protected or {}

    def policy_of(disk: str) -> RetentionPolicy | None:
        if only is not None and disk != only:
            return None
        return policy if isinstance(policy, RetentionPolicy) else policy.get(disk)

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
        rules = policy_of(d.root.disk)
        if rules is None:
            d.reasons.append("no policy")
        elif rules.tags & set(d.root.tags):
            d.reasons.append("tag " + ",".join(sorted(rules.tags & set(d.root.tags))))
    for disk, members in series.items():
        rules = policy_of(disk)
        if rules is not None:
            members.sort(key=lambda m: (m[0], m[1].root.id), reverse=True)  # newest first
            _apply_rules(members, rules)
    by_group: dict[str, list[Decision]] = {}
    for d in decisions:
        if d.root.group:
            by_group.setdefault(d.root.group, []).append(d)
    for group in by_group.values():
        if any(d.keep for d in group):
            for d in group:
                if not d.keep:
                    d.reasons.append("group")
    return [d for d in decisions if only is None or d.root.disk == only]


def emptied_disks(decisions: Iterable[Decision]) -> dict[str, int]:
    """The disks of which ``decisions`` keep no snapshot at all, with how many they forget."""
    kept: set[str] = set()
    forgotten: dict[str, int] = {}
    for d in decisions:
        if d.keep:
            kept.add(d.root.disk)
        else:
            forgotten[d.root.disk] = forgotten.get(d.root.disk, 0) + 1
    return {disk: n for disk, n in forgotten.items() if disk not in kept}


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
        cutoff = policy.within.before(members[0][0].replace(tzinfo=None))
        for moment, d in members:
            if moment.replace(tzinfo=None) >= cutoff:
                d.reasons.append(f"within {policy.within}")
