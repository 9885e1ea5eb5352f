"""The ``snapfs`` command line: one module per noun, each thin (parse, call the library, print).

Errors from the library are ``SnapfsError``s: the CLI prints their one line and exits with their
code; a traceback only with ``--debug``.

Start-up time is part of every command (and of "time to first file" for a mount), and on a cold
page cache every module imported is a disk read. So this module imports only click and names
the commands (``COMMANDS``); a command's module is imported when that command runs, and
``snapfs --help`` lists them all from the table without importing any. The CLI modules import
only click and light snapfs modules at their top; a command imports the library it calls inside
its body (trio, pyfuse3, lmdb, the codecs, boto3 for S3: together most of a second on a cold
start). ``logging`` too is set up only by the commands that may log (see ``log_to_stderr``):
asking a running daemon, as the disk commands do, logs nothing here.
``tests/test_cli_imports.py`` keeps it so.
"""

from __future__ import annotations

import gc
import importlib
import sys
from collections.abc import Sequence
from typing import Any

import click

from snapfs import __version__
from snapfs.cli.context import CliConfig, log_to_stderr, write_command_list
from snapfs.errors import SnapfsError
from snapfs.interrupt import stop_signals_interrupt

#: every command: the module of ``snapfs.cli`` that defines it (as the attribute of its name,
#: with ``_`` for ``-``), and the first paragraph of its help, which ``snapfs --help`` shows
#: without importing the module (``tests/test_cli_imports.py`` checks both against the commands)
COMMANDS = {
    "init": ("repository", "Create a new, empty repository at REPO."),
    "export": ("repository", "Write snapshot SNAP out as a raw image file (or onto a block "
                             "device)."),
    "verify": ("repository", "Check that every block of SNAPs (default: all) is present and "
                             "intact."),
    "prune": ("repository", "Delete the blobs no snapshot uses (delete does this too) and repack "
                            "sparse packs."),
    "repair": ("repository", "Rebuild what can be rebuilt of a damaged repository (its index, "
                             "from the packs; its packs, without their damaged blobs)."),
    "unlock": ("repository", "Remove stale repository locks (or, with --all, every lock not in "
                             "use on this host)."),
    "snapshot": ("snapshot", "Create, list, show, delete and forget snapshots."),
    "policy": ("policy", "Set, show and delete the retention policies that snapshot forget "
                         "applies."),
    "disk": ("disk", "Create, list, delete and roll back writable disks (served by a running "
                     "mount)."),
    "mount": ("mount", "Serve every snapshot of REPO as MOUNTPOINT/snapshots/NAME.img, fetched "
                       "as it is read."),
    "umount": ("mount", "Unmount MOUNTPOINT and wait until its daemon has exited (also cleans up "
                        "after a daemon that died)."),
    "stats": ("mount", "Show how far each image is hydrated and how the store is doing."),
    "browse": ("browse", "Mount the files inside snapshot SNAP read-only at DIRECTORY (undo with "
                         "unbrowse)."),
    "unbrowse": ("browse", "Unmount a browsed DIRECTORY, detach its loop device, stop the daemon "
                           "browse started."),
    "restore-files": ("browse", "Copy files out of snapshot SNAP into a directory, keeping their "
                                "metadata."),
}

#: the commands that set up logging themselves if they need it: what only asks a running daemon
#: logs nothing (and ``import logging`` brings traceback, textwrap and string with it);
#: ``snapshot`` decides per subcommand
SET_UP_THEIR_LOGGING = frozenset({"snapshot", "disk", "umount", "stats"})


class SnapfsGroup(click.Group):
    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        """click's, except that a mistake on the command line is one line too, as every other
        error is (click's own report is a usage line, a hint, a blank line and the error)."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:
            e.show()  # a bare ``snapfs`` or ``snapfs disk``: the help it asks for
            sys.exit(e.exit_code)
        except click.UsageError as e:
            hint = f" (try '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            click.echo(f"snapfs: {_one_line(e.format_message())}{hint}", err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            click.echo(f"snapfs: {_one_line(e.format_message())}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:  # a confirmation answered no, or ^C / end of input at its prompt
            click.echo("snapfs: aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)

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

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module = importlib.import_module(f"snapfs.cli.{COMMANDS[cmd_name][0]}")
        command: click.Command = getattr(module, cmd_name.replace("-", "_"))
        return command

    def resolve_command(self, ctx: click.Context, args: list[str]
                        ) -> tuple[str | None, click.Command | None, list[str]]:
        try:
            return super().resolve_command(ctx, args)
        except click.NoSuchCommand as e:
            # click suggests names from the commands a group holds, and this one holds none
            raise click.NoSuchCommand(e.command_name, possibilities=COMMANDS, ctx=ctx) from None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # the table's helps, so that listing the commands imports none of them
        write_command_list(formatter, [(name, text) for name, (_, text)
                                       in sorted(COMMANDS.items())])


def _one_line(message: str) -> str:
    """click's message (some have a second line: "Did you mean …?") as one line in snapfs's
    style: each part lower case first, without its final full stop, joined by "; "."""
    parts = []
    for line in message.splitlines():
        line = line.strip().removesuffix(".")
        if line[:1].isupper() and line[1:2].islower():
            line = line[0].lower() + line[1:]
        if line:
            parts.append(line)
    return "; ".join(parts)


@click.group(cls=SnapfsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-r", "--repo", envvar="SNAPFS_REPO", metavar="REPO",
              help="Repository: a local directory or s3://bucket/prefix (env SNAPFS_REPO).")
@click.option("--endpoint-url", envvar="AWS_ENDPOINT_URL", metavar="URL",
              help="S3 endpoint (env AWS_ENDPOINT_URL); credentials come the standard AWS way.")
@click.option("--debug", is_flag=True, help="Log verbosely and show tracebacks.")
# (given, not looked up: importlib.metadata scanned site-packages, a third of a cold start)
@click.version_option(version=__version__)
@click.pass_context
def cli(ctx: click.Context, repo: str | None, endpoint_url: str | None, debug: bool) -> None:
    """snapfs: block-level disk snapshots in object storage."""
    ctx.obj = CliConfig(repo, endpoint_url, debug)
    if debug or ctx.invoked_subcommand not in SET_UP_THEIR_LOGGING:
        log_to_stderr(debug)
    if ctx.invoked_subcommand != "mount":  # the daemon has its own signal handling
        ctx.with_resource(stop_signals_interrupt())


def main() -> None:
    try:
        cli(prog_name="snapfs")
    finally:
        # The process ends here (click exits), and the interpreter's last garbage collection
        # would walk every object the imports made, with no cycle left worth freeing: about
        # 7 ms, a tenth of a quick command such as a served disk's snapshot. Frozen objects
        # are left out of it.
        gc.freeze()
