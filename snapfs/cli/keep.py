"""The ``--keep-…`` options of a retention policy, which ``snapshot forget`` and ``policy set``
share, and the ``RetentionPolicy`` they make (``snapfs.repo.retention`` says what each keeps)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

_PERIOD_HELP = "Keep the newest snapshot of each of the last N {} that have one."
#: the largest count a rule takes (restic's too): a policy is stored, and a count past any
#: number of snapshots there can be keeps them all anyway
KEEP_MAX = 2**31 - 1


def keep_options(fn: F) -> F:
    """Add ``--keep-last`` … ``--keep-tag``; the command receives them as ``keep_*`` arguments
    and turns them into a policy with ``policy_from``."""
    options = [
        click.option("--keep-last", type=click.IntRange(min=1, max=KEEP_MAX), metavar="N",
                     help="Keep the N newest snapshots of each disk."),
        *[click.option(f"--keep-{period}", type=click.IntRange(min=1, max=KEEP_MAX), metavar="N",
                       help=_PERIOD_HELP.format(unit))
          for period, unit in [("hourly", "hours"), ("daily", "days"), ("weekly", "(ISO) weeks"),
                               ("monthly", "months"), ("yearly", "years")]],
        click.option("--keep-within", metavar="DURATION",
                     help="Keep every snapshot taken within DURATION before the disk's newest "
                          "one (30d, 2w, 6m, 1y, 12h, or combined: 1y6m)."),
        click.option("--keep-tag", "keep_tags", multiple=True, metavar="TAG",
                     help="Keep every snapshot with this tag (repeatable)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def policy_from(keep_last: int | None, keep_hourly: int | None, keep_daily: int | None,
                keep_weekly: int | None, keep_monthly: int | None, keep_yearly: int | None,
                keep_within: str | None, keep_tags: tuple[str, ...]) -> Any:
    """The ``RetentionPolicy`` the options give (empty if none was given)."""
    from snapfs.format.names import check_text
    from snapfs.repo.retention import Duration, RetentionPolicy

    for tag in keep_tags:  # "": would keep the snapshots of an empty tag, which none can have
        check_text(tag, "--keep-tag")
    return RetentionPolicy(
        last=keep_last or 0, hourly=keep_hourly or 0, daily=keep_daily or 0,
        weekly=keep_weekly or 0, monthly=keep_monthly or 0, yearly=keep_yearly or 0,
        within=Duration.parse(keep_within) if keep_within is not None else None,
        tags=frozenset(keep_tags))
