"""What every command gets from the top-level options: where the repository is, and how to log
(and, for the disk commands, where this host keeps the repository's disks)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

from snapfs.errors import NoDiskDaemon, SnapfsError, UsageError

if TYPE_CHECKING:
    from snapfs.repo.repository import Repository


@dataclass(frozen=True)
class CliConfig:
    repo: str | None
    endpoint_url: str | None
    debug: bool

    def open_repository(self) -> Repository:
        from snapfs.repo.repository import Repository
        from snapfs.store import open_store

        return Repository.open(open_store(self.require_repo(), self.endpoint_url))

    def require_repo(self) -> str:
        if not self.repo:
            raise UsageError("no repository given: use -r REPO or set SNAPFS_REPO")
        scheme = _SCHEME.match(self.repo)
        if scheme and scheme.group(1) != "s3":
            raise UsageError(f"not a repository location: {self.repo!r} (a directory path, or "
                             "s3://BUCKET[/PREFIX])")
        return self.repo


#: a location that begins with a URL's scheme: ``s3://`` is the one snapfs knows. Any other
#: (``file:///srv/repo``, borg's way to write a local path; ``sftp://``; ``S3://``) was taken
#: for a directory of that name under the working directory, which ``init`` made
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def not_empty(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """A click callback for a path that must not be ``""``: an unset variable in ``"$DIR"``,
    most likely, which was taken for the working directory (a mount point, a browse's or a
    restore's directory, a source), or for no such option at all (``--cache-dir``: the
    default cache; ``--prefetch-list``: none)."""
    if value == "" or isinstance(value, tuple) and "" in value:
        raise click.BadParameter("must not be empty", ctx, param)
    return value


pass_config = click.make_pass_decorator(CliConfig)


@contextmanager
def naming_the_disks_cache(config: CliConfig) -> Iterator[None]:
    """Where no mount of the repository runs, say which cache directory holds its disks here.

    A disk lives in the cache directory of the mount that made it: after a reboot, "start a
    mount" alone sent users to the default cache, where none of their disks are. This host's
    hold in the repository names the state directory (``CACHE/disks/REPO-ID``) of its disks."""
    try:
        yield
    except NoDiskDaemon as e:
        from snapfs.control import no_disk_daemon

        caches = _disk_caches(config)
        if not caches:
            raise
        raise no_disk_daemon(config.require_repo(), caches) from e


def _disk_caches(config: CliConfig) -> list[str]:
    """The cache directories on this host whose disk state this repository's holds name."""
    from pathlib import Path

    from snapfs.host import hostname, machine_id

    try:
        holds = config.open_repository().holds()
    except SnapfsError:  # the store down, a damaged hold: the plain error says enough
        return []
    return sorted({str(Path(h.state).parents[1]) for h in holds.values()
                   if h.host == hostname() and h.machine == machine_id()
                   and os.path.isdir(h.state)})


def write_command_list(formatter: click.HelpFormatter, helps: list[tuple[str, str]]) -> None:
    """The "Commands" section of a group's ``--help``: each command with the whole first
    paragraph of its help, wrapped (click cut it off at the terminal's width with "...", often
    mid-phrase: "Mount the files inside snapshot SNAP read-only at...")."""
    rows = [(name, " ".join(text.split("\n\n")[0].split())) for name, text in helps]
    if rows:
        with formatter.section("Commands"):
            formatter.write_dl(rows)


class SubcommandGroup(click.Group):
    """A noun's group (``snapshot``, ``disk``, …), its commands listed by
    ``write_command_list``."""

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        write_command_list(formatter, [(name, command.help or "") for name, command
                                       in sorted(self.commands.items()) if not command.hidden])


def log_to_stderr(debug: bool) -> None:
    """Log records to stderr as ``snapfs: LEVEL: message``: from DEBUG with ``--debug``, else
    from WARNING. Called before a command's library runs (a second call changes nothing);
    ``logging`` is imported here because a command that only asks a daemon never needs it."""
    import logging

    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="snapfs: %(levelname)s: %(message)s")
