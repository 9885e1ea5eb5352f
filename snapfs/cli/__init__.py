"""The ``snapfs`` command line: one module per noun, each thin (parse, call the library, print).

Errors from the library are ``SnapfsError``s: the CLI prints their one line and exits with their
code; a traceback only with ``--debug``.

Start-up time is part of every command (and of "time to first file" for a mount), so the CLI
modules import only click and light snapfs modules at their top; a command imports the library
it calls inside its body (trio, pyfuse3, lmdb, the codecs, boto3 for S3: together most of a
second on a cold start), so ``snapfs --help`` pays for none of them and each command only for
its own. ``tests/test_cli_imports.py`` keeps it so.
"""

from __future__ import annotations

import logging
from typing import Any

import click

from snapfs.cli import browse, disk, mount, repository, snapshot
from snapfs.cli.context import CliConfig
from snapfs.errors import SnapfsError


class SnapfsGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SnapfsError as e:
            if isinstance(ctx.obj, CliConfig) and ctx.obj.debug:
                raise
            click.echo(f"snapfs: {e.message}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("snapfs: interrupted", err=True)
            ctx.exit(130)


@click.group(cls=SnapfsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-r", "--repo", envvar="SNAPFS_REPO", metavar="REPO",
              help="Repository: a local directory or s3://bucket/prefix (env SNAPFS_REPO).")
@click.option("--endpoint-url", envvar="AWS_ENDPOINT_URL", metavar="URL",
              help="S3 endpoint (env AWS_ENDPOINT_URL); credentials come the standard AWS way.")
@click.option("--debug", is_flag=True, help="Log verbosely and show tracebacks.")
@click.version_option(package_name="snapfs")
@click.pass_context
def cli(ctx: click.Context, repo: str | None, endpoint_url: str | None, debug: bool) -> None:
    """snapfs: block-level disk snapshots in object storage."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="snapfs: %(levelname)s: %(message)s")
    ctx.obj = CliConfig(repo, endpoint_url, debug)


for command in (*repository.COMMANDS, snapshot.snapshot, *disk.COMMANDS, *mount.COMMANDS,
                *browse.COMMANDS):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="snapfs")
