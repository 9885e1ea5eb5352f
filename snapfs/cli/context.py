"""What every command gets from the top-level options: where the repository is, and how to log."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import click

from snapfs.errors import UsageError

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
        return self.repo


pass_config = click.make_pass_decorator(CliConfig)


def log_to_stderr(debug: bool) -> None:
    """Log records to stderr as ``snapfs: LEVEL: message``: from DEBUG with ``--debug``, else
    from WARNING. Called before a command's library runs (a second call changes nothing);
    ``logging`` is imported here because a command that only asks a daemon never needs it."""
    import logging

    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="snapfs: %(levelname)s: %(message)s")
