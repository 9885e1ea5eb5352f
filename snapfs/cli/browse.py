"""``snapfs browse``, ``snapfs unbrowse``, ``snapfs restore-files``: the files inside a snapshot.

Thin: options become a ``BrowseOptions`` (and ``RestoreOptions``) and go to ``snapfs.browse``,
which finds or starts the mount daemon, attaches the image and keeps the state ``unbrowse``
undoes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from snapfs.cli.context import CliConfig, not_empty, pass_config
from snapfs.cli.mount import default_cache_dir
from snapfs.cli.output import emit_json, human_size, parse_size, printable, progress_for
from snapfs.plural import counted
from snapfs.progress import NO_PROGRESS

if TYPE_CHECKING:
    from snapfs.browse import BrowseOptions, BrowseState
    from snapfs.restore import RestoreReport

#: the cache of a daemon browse starts (as ``snapfs mount``'s default)
CACHE_SIZE = "20G"
#: ``snapfs.restore.ON_CONFLICT`` spelled out (``RestoreOptions`` checks it again): importing
#: the restorer just to draw the options would cost every command its imports
ON_CONFLICT = ("skip", "overwrite")


def _options(config: CliConfig, snap: str, directory: str, fuse2fs: bool,
             partition: int | None) -> BrowseOptions:
    from snapfs.browse import BrowseOptions

    return BrowseOptions(
        repository=config.require_repo(), snapshot=snap, directory=directory,
        cache_dir=default_cache_dir(), cache_size=parse_size(CACHE_SIZE),
        endpoint_url=config.endpoint_url, use_fuse2fs=fuse2fs, debug=config.debug,
        partition=partition,
    )


#: a partitioned image's partition to open (``partx``'s numbers: 1-4 primary, 5+ logical)
PARTITION = click.option(
    "--partition", type=click.IntRange(min=1), metavar="N",
    help="Of a partitioned disk image (MBR or GPT): the partition whose filesystem to open "
         "(default: the only one holding a filesystem snapfs opens).")


def _describe(state: BrowseState) -> str:
    how = f"{state.filesystem} on {state.loop_device}" if state.loop_device else (
        f"{state.filesystem} via fuse2fs")
    if state.partition is not None:
        how = f"partition {state.partition}, {how}"
    daemon = "started" if state.daemon_started else "reused"
    return (f"browsing {state.snapshot_name} ({state.snapshot_id}) at {state.directory}: {how}; "
            f"snapfs daemon {daemon} at {state.daemon_mountpoint} (pid {state.daemon_pid})")


@click.command()
@click.argument("snap")
@click.argument("directory", type=click.Path(), callback=not_empty)
@click.option("--fuse2fs", is_flag=True,
              help="Mount with fuse2fs instead of a loop device (the default when not root).")
@PARTITION
@click.option("--json", "json_output", is_flag=True, help="Print what was done as JSON.")
@pass_config
def browse(config: CliConfig, snap: str, directory: str, fuse2fs: bool, partition: int | None,
           json_output: bool) -> None:
    """Mount the files inside snapshot SNAP read-only at DIRECTORY (undo with unbrowse)."""
    from snapfs.browse import browse as browse_snapshot

    state = browse_snapshot(_options(config, snap, directory, fuse2fs, partition))
    if json_output:
        emit_json(state.as_dict())
    else:
        click.echo(_describe(state))


@click.command()
@click.argument("directory", type=click.Path(), callback=not_empty)
def unbrowse(directory: str) -> None:
    """Unmount a browsed DIRECTORY, detach its loop device, stop the daemon browse started."""
    from snapfs.browse import unbrowse as unbrowse_directory

    click.echo(unbrowse_directory(directory))


def _print_entries(report: RestoreReport) -> None:
    """One line each (a name may hold a newline: escaped, as labels are)."""
    for failure in report.failures:
        click.echo(f"snapfs: failed: {printable(failure)}", err=True)
    for special in report.special:
        click.echo(f"snapfs: left out: {printable(special)}", err=True)
    for pattern in report.unmatched:
        click.echo(f"snapfs: warning: --include {printable(pattern)} matched nothing", err=True)


@click.command("restore-files")
@click.argument("snap")
@click.option("--to", "target", required=True, type=click.Path(file_okay=False),
              callback=not_empty,
              help="Directory to restore into (created if missing).")
@click.option("--include", "includes", multiple=True, metavar="GLOB",
              help="Restore only paths matching GLOB (repeatable; ** spans directories, "
                   "\\ makes the next character literal).")
@click.option("--exclude", "excludes", multiple=True, metavar="GLOB",
              help="Leave out paths matching GLOB (repeatable).")
@click.option("--on-conflict", type=click.Choice(ON_CONFLICT), default="skip",
              show_default=True, help="What to do with an entry already in the target.")
@click.option("--fuse2fs", is_flag=True,
              help="Read the snapshot through fuse2fs instead of a loop device.")
@PARTITION
@click.option("--json", "json_output", is_flag=True, help="Print the report as JSON.")
@pass_config
def restore_files(config: CliConfig, snap: str, target: str, includes: tuple[str, ...],
                  excludes: tuple[str, ...], on_conflict: str, fuse2fs: bool,
                  partition: int | None, json_output: bool) -> None:
    """Copy files out of snapshot SNAP into a directory, keeping their metadata."""
    from snapfs.browse import RestoreStopped, restore_from_snapshot
    from snapfs.restore import RestoreOptions

    restore = RestoreOptions(includes, excludes, on_conflict)  # bad patterns fail first
    bar = progress_for(json_output)
    try:  # (SIGTERM and SIGHUP interrupt it as ^C does: snapfs.interrupt.stop_signals_interrupt)
        try:
            state, report = restore_from_snapshot(_options(config, snap, "", fuse2fs, partition),
                                                  target, restore, bar or NO_PROGRESS)
        finally:
            if bar is not None:
                bar.close()
    except RestoreStopped as e:
        # what was done before the stop is not lost: the report so far, then the one line
        if json_output:
            emit_json({"snapshot": e.state.snapshot_id, "target": target,
                       **e.report.as_dict(), "error": e.message})
        else:
            _print_entries(e.report)
        raise
    if json_output:
        emit_json({"snapshot": state.snapshot_id, "target": target, **report.as_dict()})
    else:
        _print_entries(report)
        links = ("" if not report.links else ", 1 of them a hard link" if report.links == 1
                 else f", {report.links} of them hard links")
        click.echo(f"restored {counted(report.restored, 'file')} ({human_size(report.bytes)}{links}) from "
                   f"{state.snapshot_name} into {target}: {report.skipped} skipped, "
                   f"{report.failed} failed")
    if report.failed:
        raise SystemExit(1)
