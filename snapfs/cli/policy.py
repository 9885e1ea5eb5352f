"""``snapfs policy …``: the retention policies stored in a repository, which ``snapshot forget``
applies when it is given no ``--keep-…`` rules of its own: one for every disk (the default) and
one per disk that replaces it for that disk."""

from __future__ import annotations

from typing import Any

import click

from snapfs.cli.context import CliConfig, SubcommandGroup, pass_config
from snapfs.cli.keep import keep_options, policy_from
from snapfs.cli.output import emit_json, printable, table_lines
from snapfs.errors import NotFoundError, UsageError
from snapfs.format.names import policy_disk_part


@click.group(cls=SubcommandGroup)
def policy() -> None:
    """Set, show and delete the retention policies that snapshot forget applies."""


def _whose(disk: str | None) -> str:
    # (on one line: a disk's label may hold a newline, and an error is one line)
    return f"disk {printable(disk)}" if disk is not None else "every disk without its own (default)"


@policy.command("set")
@keep_options
@click.option("--disk", metavar="DISK",
              help="The disk it is for (default: every disk without a policy of its own).")
@click.option("--json", "json_output", is_flag=True, help="Print the result as JSON.")
@pass_config
def set_(config: CliConfig, disk: str | None, json_output: bool, **keep: Any) -> None:
    """Store a retention policy (replacing the one stored for the same disk, if any)."""
    rules = policy_from(**keep)
    if rules.empty():
        raise UsageError("policy set needs at least one --keep-… rule")
    if disk is not None:
        policy_disk_part(disk)  # before the repository is opened: the rule alone decides
    config.open_repository().write_policy(disk, rules)
    if json_output:
        emit_json({"disk": disk, "keep": rules.rules()})
    else:
        click.echo(f"retention policy of {_whose(disk)}: keep {printable(str(rules))}")


@policy.command()
@click.option("--json", "json_output", is_flag=True, help="Print the result as JSON.")
@pass_config
def show(config: CliConfig, json_output: bool) -> None:
    """Show the stored retention policies."""
    default, per_disk = config.open_repository().retention_policies()
    if json_output:
        emit_json({"default": default.rules() if default else None,
                   "disks": {name: p.rules() for name, p in sorted(per_disk.items())}})
        return
    if default is None and not per_disk:
        click.echo("no retention policy stored: snapshot forget needs --keep-… rules")
        return
    rows = [("DISK", "KEEP")]
    rows += [("(default)", str(default) if default else "- (snapshots of other disks are kept)")]
    rows += [(name, str(p)) for name, p in sorted(per_disk.items())]
    click.echo("\n".join(table_lines(rows)))


@policy.command()
@click.option("--disk", metavar="DISK",
              help="The disk whose policy to delete (default: the default policy).")
@pass_config
def delete(config: CliConfig, disk: str | None) -> None:
    """Delete a stored retention policy."""
    if disk is not None:
        policy_disk_part(disk, stored=False)
    if not config.open_repository().delete_policy(disk):
        raise NotFoundError(f"no retention policy stored for {_whose(disk)}")
    click.echo(f"deleted the retention policy of {_whose(disk)}")
