"""``snapfs disk …``: writable disks served by the running mount daemon of a repository."""

from __future__ import annotations

import sys
from typing import Any

import click

from snapfs.cli.context import CliConfig, SubcommandGroup, naming_the_disks_cache, pass_config
from snapfs.cli.output import emit_json, human_size, parse_size, table_lines
from snapfs.errors import UsageError
from snapfs.format.names import check_disk_name
from snapfs.plural import counted


@click.group(cls=SubcommandGroup)
def disk() -> None:
    """Create, list, delete and roll back writable disks (served by a running mount)."""


@disk.command()
@click.argument("name")
@click.option("--from", "source", metavar="SNAP", help="The snapshot it starts as.")
@click.option("--size", metavar="SIZE", help="Its size (default: the snapshot's; may grow it).")
@click.option("--json", "json_output", is_flag=True, help="Print the result as JSON.")
@pass_config
def create(config: CliConfig, name: str, source: str | None, size: str | None,
           json_output: bool) -> None:
    """Create disk NAME from a snapshot (usable at once), or empty with --size alone."""
    from snapfs.write.client import call

    if source is None and size is None:
        raise UsageError("give --from SNAP, --size SIZE, or both")
    check_disk_name(name)  # (the daemon checks it too: this says so without one)
    nbytes = parse_size(size) if size is not None else None
    with naming_the_disks_cache(config):
        reply = call(config.require_repo(), {"op": "disk-create", "name": name, "from": source,
                                             "size": nbytes})
    if json_output:
        emit_json(reply["disk"])
    else:
        d = reply["disk"]
        click.echo(f"disk {d['name']} created ({human_size(d['size'])}, from "
                   f"{d['source'] or 'nothing'}): {d['path']}")


@disk.command("list")
@click.option("--json", "json_output", is_flag=True, help="Print the result as JSON.")
@pass_config
def list_(config: CliConfig, json_output: bool) -> None:
    """List the disks, with what was written and what is uploading."""
    from snapfs.write.client import call

    with naming_the_disks_cache(config):
        disks: list[dict[str, Any]] = call(config.require_repo(), {"op": "disk-list"})["disks"]
    if json_output:
        emit_json(disks)
        return
    rows = [("NAME", "SIZE", "SOURCE", "WRITTEN", "CHANGED", "UPLOADING", "OPEN")]
    for d in disks:
        source = d["source"] or (f"{d['base']} (deleted)" if d.get("base_deleted") else "-")
        rows.append((d["name"], human_size(d["size"]), source,
                     human_size(d["blocks_written"] * d["block_size"]),
                     human_size(d["blocks_changed"] * d["block_size"]),
                     # (a daemon started before the names were listed: the ids)
                     ",".join(d.get("uploading_names", d["uploading"])) or "-",
                     str(d["open"])))
    click.echo("\n".join(table_lines(rows)))
    for d in disks:
        if d.get("failed"):
            click.echo(f"disk {d['name']} failed: {d['failed']}")
        elif d.get("failed_before_restart"):
            click.echo(f"disk {d['name']} failed before the daemon restarted: "
                       f"{d['failed_before_restart']}")


@disk.command()
@click.argument("name")
@pass_config
def delete(config: CliConfig, name: str) -> None:
    """Delete disk NAME and everything written to it (refused while it is open or attached)."""
    from snapfs.write.client import call

    with naming_the_disks_cache(config):
        call(config.require_repo(), {"op": "disk-delete", "name": name})
    click.echo(f"disk {name} deleted")


@disk.command()
@click.argument("name")
@click.argument("snap")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--json", "json_output", is_flag=True, help="Print the result as JSON.")
@pass_config
def rollback(config: CliConfig, name: str, snap: str, yes: bool, json_output: bool) -> None:
    """Make disk NAME equal snapshot SNAP; what was written since is lost."""
    from snapfs.write.client import call

    if not yes:
        if not sys.stdin.isatty():
            raise UsageError("rollback loses what was written since the snapshot: "
                             "pass --yes to confirm")
        click.confirm(f"Roll disk {name} back to {snap}? Everything written to it since is lost",
                      abort=True)
    with naming_the_disks_cache(config):
        reply = call(config.require_repo(),
                     {"op": "disk-rollback", "name": name, "snapshot": snap})
    result = reply["rollback"]
    if json_output:
        emit_json(result)
    elif result["whole_overlay"]:
        click.echo(f"disk {name} rolled back to {result['snapshot_name']} "
                   "(every written block reset)")
    else:
        click.echo(f"disk {name} rolled back to {result['snapshot_name']} "
                   f"({counted(result['blocks_reset'], 'block')} reset)")
