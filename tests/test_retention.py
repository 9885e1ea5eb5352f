"""Retention policies (``snapfs.repo.retention``): which snapshots ``snapshot forget`` keeps.

Pure tests on snapshot roots with chosen creation times, counted in UTC so that they do not
depend on the machine's zone; ``test_cli.py`` runs the command against both stores.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from snapfs.errors import UsageError
from snapfs.format.manifest import SnapshotRoot
from snapfs.repo.retention import Duration, RetentionPolicy, decide, emptied_disks

START = datetime(2026, 1, 1, 9, 0, tzinfo=UTC)


def root(n: int, when: datetime, disk: str = "vm", tags: list[str] | None = None,
         group: str | None = None) -> SnapshotRoot:
    created = when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return SnapshotRoot(id=f"{disk}-{n:04d}", name=f"{disk}-{n}", disk=disk, parent=None,
                        size=1 << 20, block_size=16384, created=created, entries_per_page=4096,
                        pages=[], tags=tags or [], group=group)


def kept(roots: list[SnapshotRoot], policy: RetentionPolicy, **kw: object) -> dict[str, list[str]]:
    """id -> reasons of the kept snapshots."""
    return {d.root.id: d.reasons for d in decide(roots, policy, tz=UTC, **kw)  # type: ignore[arg-type]
            if d.keep}


def daily(days: int, per_day: int = 1, disk: str = "vm") -> list[SnapshotRoot]:
    """``per_day`` snapshots a day, 3 hours apart, for ``days`` days from START."""
    return [root(d * per_day + k, START + timedelta(days=d, hours=3 * k), disk)
            for d in range(days) for k in range(per_day)]


def test_keep_last_keeps_the_newest() -> None:
    roots = daily(10)
    assert set(kept(roots, RetentionPolicy(last=3))) == {"vm-0009", "vm-0008", "vm-0007"}
    assert len(kept(roots, RetentionPolicy(last=50))) == 10


def test_keep_daily_keeps_the_last_snapshot_of_each_day() -> None:
    roots = daily(40, per_day=3)  # 09:00, 12:00, 15:00
    result = kept(roots, RetentionPolicy(daily=30))
    assert len(result) == 30
    # the 15:00 snapshot (the third of each day) of the 30 newest days
    assert set(result) == {f"vm-{d * 3 + 2:04d}" for d in range(10, 40)}
    assert all(reasons == ["daily"] for reasons in result.values())


def test_days_without_a_snapshot_do_not_count() -> None:
    every_other_day = [root(d, START + timedelta(days=2 * d)) for d in range(40)]
    result = kept(every_other_day, RetentionPolicy(daily=30))
    assert set(result) == {f"vm-{d:04d}" for d in range(10, 40)}  # 30 snapshots, 60 days back


def test_keep_hourly_weekly_monthly_yearly() -> None:
    # one snapshot every 6 hours for about two years
    roots = [root(n, START + timedelta(hours=6 * n)) for n in range(4 * 800)]
    newest = START + timedelta(hours=6 * (len(roots) - 1))
    by_id = {r.id: datetime.fromisoformat(r.created) for r in roots}

    hourly = kept(roots, RetentionPolicy(hourly=5))
    assert len(hourly) == 5 and max(by_id[i] for i in hourly) == newest

    weekly = kept(roots, RetentionPolicy(weekly=4))
    weeks = {by_id[i].isocalendar()[:2] for i in weekly}
    assert len(weeks) == 4
    for i in weekly:  # each is the newest of its week
        same_week = [t for t in by_id.values() if t.isocalendar()[:2] == by_id[i].isocalendar()[:2]]
        assert by_id[i] == max(same_week)

    monthly = kept(roots, RetentionPolicy(monthly=13))
    months = sorted((by_id[i].year, by_id[i].month) for i in monthly)
    assert len(months) == 13 and months[-1] == (newest.year, newest.month)

    yearly = kept(roots, RetentionPolicy(yearly=5))
    assert sorted(by_id[i].year for i in yearly) == [2026, 2027, 2028]  # every year there is
    assert max(by_id[i] for i in yearly) == newest


def test_rules_add_up_and_every_reason_is_given() -> None:
    roots = daily(10, per_day=2)  # 09:00 and 12:00
    result = kept(roots, RetentionPolicy(last=3, daily=2))
    assert result == {"vm-0019": ["last", "daily"], "vm-0018": ["last"],
                      "vm-0017": ["last", "daily"]}


def test_keep_within_counts_back_from_the_newest_snapshot() -> None:
    roots = daily(100)  # the newest is START + 99 days, long before "now" in this test
    result = kept(roots, RetentionPolicy(within=Duration.parse("30d")))
    assert set(result) == {f"vm-{d:04d}" for d in range(69, 100)}  # 30 days back, inclusive
    assert all(reasons == ["within 30d"] for reasons in result.values())


def test_keep_within_months_are_calendar_months() -> None:
    march_31 = datetime(2026, 3, 31, 12, 0, tzinfo=UTC)
    assert Duration.parse("1m").before(march_31) == datetime(2026, 2, 28, 12, 0, tzinfo=UTC)
    assert Duration.parse("1y1m").before(march_31) == datetime(2025, 2, 28, 12, 0, tzinfo=UTC)
    assert Duration.parse("2w3d12h").before(march_31) == datetime(2026, 3, 14, 0, 0, tzinfo=UTC)
    assert str(Duration.parse("1Y6M")) == "1y6m"


@pytest.mark.parametrize("text", ["", "30", "d", "30x", "3d 4h", "-1d", "1d1d", "1.5d"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(UsageError):
        Duration.parse(text)


def test_each_disk_is_its_own_series() -> None:
    busy = daily(50, disk="busy")
    quiet = [root(0, START - timedelta(days=400), "quiet"), root(1, START - timedelta(days=300),
                                                                 "quiet")]
    result = kept(busy + quiet, RetentionPolicy(last=2))
    assert set(result) == {"busy-0049", "busy-0048", "quiet-0000", "quiet-0001"}


def test_tags_groups_and_protected_snapshots_are_kept() -> None:
    roots = daily(6)
    roots[0].tags = ["before-upgrade"]
    roots[1].group, roots[2].group = "g1", "g2"
    other = root(1, datetime.fromisoformat(roots[1].created), disk="db", group="g1")
    result = kept(roots + [other], RetentionPolicy(last=1, tags=frozenset({"before-upgrade"})),
                  protected={roots[3].id: "base of disk web"})
    assert result == {
        "vm-0000": ["tag before-upgrade"],
        "vm-0003": ["base of disk web"],
        "vm-0005": ["last"],
        "db-0001": ["last"],  # the newest of disk db...
        "vm-0001": ["group"],  # ...keeps the rest of its consistency group
    }


def test_an_unreadable_time_is_kept() -> None:
    roots = daily(3)
    roots[0].created = "yesterday"
    roots[1].created = "2026-01-02T09:00:00"  # no zone: not written by snapfs
    result = kept(roots, RetentionPolicy(last=1))
    assert result == {"vm-0000": ["creation time unreadable"],
                      "vm-0001": ["creation time unreadable"], "vm-0002": ["last"]}


def test_periods_follow_the_zone_they_are_counted_in() -> None:
    # 23:30 and 00:30 UTC: two days in UTC, one day two hours east of it
    roots = [root(0, datetime(2026, 5, 1, 23, 30, tzinfo=UTC)),
             root(1, datetime(2026, 5, 2, 0, 30, tzinfo=UTC))]
    policy = RetentionPolicy(daily=5)
    assert {d.root.id for d in decide(roots, policy, tz=UTC) if d.keep} == {"vm-0000", "vm-0001"}
    east = timezone(timedelta(hours=2))
    assert {d.root.id for d in decide(roots, policy, tz=east) if d.keep} == {"vm-0001"}


def test_an_empty_policy_keeps_nothing() -> None:
    assert RetentionPolicy().empty()
    assert not RetentionPolicy(tags=frozenset({"x"})).empty()
    assert kept(daily(3), RetentionPolicy()) == {}


def test_a_tag_that_no_snapshot_of_a_disk_carries_leaves_it_empty() -> None:
    # the one way a policy forgets every snapshot of a disk; forget refuses it (test_cli.py)
    roots = daily(4) + daily(2, disk="db")
    roots[1].tags = ["pinned"]
    policy = RetentionPolicy(tags=frozenset({"pinned"}))
    assert emptied_disks(decide(roots, policy, tz=UTC)) == {"db": 2}
    assert emptied_disks(decide(roots, policy, tz=UTC, only="vm")) == {}
    assert emptied_disks(decide(roots, policy, tz=UTC, protected={"db-0000": "base"})) == {}
    assert emptied_disks(decide(roots, RetentionPolicy(last=1), tz=UTC)) == {}


def test_a_stored_policy_reads_back_and_a_bad_one_is_refused() -> None:
    from snapfs.errors import CorruptBlock, FormatError

    policy = RetentionPolicy(last=2, daily=30, within=Duration.parse("1y6m"),
                             tags=frozenset({"b", "a"}))
    assert RetentionPolicy.decode(policy.encode()) == policy
    assert str(policy) == "last 2, daily 30, within 1y6m, tags a,b"
    good = b'{"format":"snapfs-retention-policy","version":1,"keep":'
    # strict: a policy read as keeping less than it says would make forget delete the rest
    for data, error in [(b"[]", CorruptBlock), (b'{"format":"x"}', CorruptBlock),
                        (good.replace(b"1,", b"2,") + b"{}}", FormatError),
                        (good + b'{"daily":-1}}', CorruptBlock),
                        (good + b'{"daily":"many"}}', CorruptBlock),
                        (good + b'{"within":"soon"}}', CorruptBlock),
                        (good + b"[]}", CorruptBlock),
                        (good + b"{}}", CorruptBlock),  # keeps nothing
                        (good + b'{"keep-daily":7}}', CorruptBlock),  # a rule it does not know
                        (good + b'{"last":0}}', CorruptBlock),
                        (good + b'{"last":true}}', CorruptBlock),
                        (good + b'{"last":1.5}}', CorruptBlock),
                        (good + b'{"last":1e400}}', CorruptBlock),
                        (good + b'{"tags":"ab"}}', CorruptBlock),
                        (good + b'{"within":30}}', CorruptBlock)]:
        with pytest.raises(error):
            RetentionPolicy.decode(data)


def test_per_disk_policies_and_a_disk_without_one() -> None:
    roots = daily(3, disk="web") + daily(3, disk="db")
    result = kept(roots, {"web": RetentionPolicy(last=1), "db": None})
    assert result == {"web-0002": ["last"], "db-0000": ["no policy"],
                      "db-0001": ["no policy"], "db-0002": ["no policy"]}


def test_keep_within_counts_wall_clock_time_across_summer_time() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    newest = root(1, datetime(2026, 11, 30, 12, 0, tzinfo=berlin))  # CET
    summer = root(0, datetime(2026, 4, 30, 12, 30, tzinfo=berlin))  # CEST: inside 7 months
    before = root(2, datetime(2026, 4, 30, 11, 30, tzinfo=berlin))  # outside
    result = {d.root.id for d in decide([before, summer, newest],
                                        RetentionPolicy(within=Duration.parse("7m")), tz=berlin)
              if d.keep}
    assert result == {newest.id, summer.id}


def test_a_span_longer_than_the_calendar_keeps_everything() -> None:
    roots = daily(3)
    assert len(kept(roots, RetentionPolicy(within=Duration.parse("3000y")))) == 3
    assert len(kept(roots, RetentionPolicy(within=Duration.parse("9999999d")))) == 3
    with pytest.raises(UsageError):
        Duration.parse("99999999d")


def test_judging_one_disk_keeps_its_groups_whole() -> None:
    """``forget --disk a``: b's snapshots are not judged (so kept), and they keep their
    consistency groups' members on a, which the rules alone would forget."""
    a = daily(3, disk="a")
    b = [root(n, datetime.fromisoformat(r.created), disk="b") for n, r in enumerate(a)]
    for n in range(3):
        a[n].group = b[n].group = f"g{n}"
    result = {d.root.id: d.reasons for d in decide(a + b, RetentionPolicy(last=1), tz=UTC,
                                                    only="a")}
    assert result == {"a-0000": ["group"], "a-0001": ["group"], "a-0002": ["last"]}
    alone = {d.root.id: d.reasons for d in decide(a, RetentionPolicy(last=1), tz=UTC, only="a")}
    assert alone == {"a-0000": [], "a-0001": [], "a-0002": ["last"]}
