"""``snapfs snapshot …``: create, list, show and delete snapshots."""

from __future__ import annotations

import click

from snapfs.cli.context import CliConfig, pass_config
from snapfs.cli.output import emit_json, human_size, run_async
from snapfs.errors import UsageError
from snapfs.repo.create import CreateOptions, create_snapshot
from snapfs.repo.gc import delete_snapshots


@click.group()
def snapshot() -> None:
    """Create, list, show and delete snapshots."""


@snapshot.command()
@click.argument("source")
@click.option("--name", help="A unique name (default: DISK-YYYYMMDD-HHMMSS).")
@click.option("--disk", help="The disk this is a snapshot of (default: SOURCE's file name).")
@click.option("--parent", metavar="SNAP",
              help="The snapshot this one follows (default: the newest of the same disk).")
@click.option("--tag", "tags", multiple=True, help="A tag to attach (repeatable).")
@click.option("--rate", type=float, metavar="MB/s", help="Cap upload throughput (10^6 bytes/s).")
@click.option("--json", "json_output", is_flag=True, help="Print the result as JSON.")
@pass_config
def create(config: CliConfig, source: str, name: str | None, disk: str | None,
           parent: str | None, tags: tuple[str, ...], rate: float | None,
           json_output: bool) -> None:
    """Snapshot SOURCE (an image file or block device): full the first time, then incremental."""
    if rate is not None and rate <= 0:
        raise UsageError("--rate must be a positive number of MB/s")
    repo = config.open_repository()
    options = CreateOptions(name=name, disk=disk, parent=parent, tags=tags,
                            rate=rate * 1e6 if rate else None)
    result = run_async(lambda p: create_snapshot(repo, source, options, p), json_output)
    if json_output:
        emit_json(result.summary())
    else:
        click.echo(result.root.id)


@snapshot.command("list")
@click.option("--disk", help="Only snapshots of this disk.")
@click.option("--json", "json_output", is_flag=True)
@pass_config
def list_(config: CliConfig, disk: str | None, json_output: bool) -> None:
    """List snapshots, oldest first."""
    roots = [r for r in config.open_repository().snapshots() if disk is None or r.disk == disk]
    if json_output:
        emit_json([r.summary() for r in roots])
        return
    rows = [("ID", "NAME", "DISK", "SIZE", "CREATED", "PARENT")]
    rows += [(r.id, r.name, r.disk, human_size(r.size), r.created[:19].replace("T", " "),
              r.parent or "-") for r in roots]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


@snapshot.command()
@click.argument("snap")
@click.option("--json", "json_output", is_flag=True)
@pass_config
def show(config: CliConfig, snap: str, json_output: bool) -> None:
    """Show one snapshot."""
    root = config.open_repository().resolve(snap)
    doc = root.summary()
    if json_output:
        emit_json(doc)
        return
    for key, value in doc.items():
        click.echo(f"{key + ':':18} {value if value is not None else '-'}")


@snapshot.command()
@click.argument("snaps", nargs=-1, required=True, metavar="SNAP...")
@click.option("--json", "json_output", is_flag=True)
@pass_config
def delete(config: CliConfig, snaps: tuple[str, ...], json_output: bool) -> None:
    """Delete snapshots and the blocks no other snapshot uses."""
    repo = config.open_repository()
    roots = repo.snapshots()
    chosen = {r.id: r for r in (repo.resolve(s, roots) for s in snaps)}
    stats = run_async(lambda _p: delete_snapshots(repo, list(chosen.values())), json_output)
    if json_output:
        emit_json(stats)
    else:
        click.echo(f"deleted {len(chosen)} snapshots; freed {human_size(stats['bytes_freed'])}")
