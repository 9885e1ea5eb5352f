"""Commands about the repository as a whole: init, export, verify, prune, unlock."""

from __future__ import annotations

import os

import click

from snapfs.cli.context import CliConfig, SubcommandGroup, pass_config
from snapfs.cli.output import emit_json, human_size, parse_size, run_async
from snapfs.errors import IntegrityError, SnapshotNotFound, UsageError
from snapfs.plural import counted
from snapfs.repo.defaults import DEFAULT_BLOCK_SIZE, DEFAULT_COMPRESSION_LEVEL


@click.command()
@click.option("--block-size", default=str(DEFAULT_BLOCK_SIZE // 1024) + "K", show_default=True,
              metavar="SIZE",
              help="Unit of change tracking and dedup: a power of two from 4K to 4M.")
@click.option("--compression-level", default=DEFAULT_COMPRESSION_LEVEL, show_default=True,
              type=int, help="zstd level for blocks (-7 to 22).")
@click.option("--json", "json_output", is_flag=True, help="Print the new repository as JSON.")
@pass_config
def init(config: CliConfig, block_size: str, compression_level: int, json_output: bool) -> None:
    """Create a new, empty repository at REPO."""
    from snapfs.format.repoconfig import check_block_size
    from snapfs.repo.repository import Repository
    from snapfs.store import open_store

    store = open_store(config.require_repo(), config.endpoint_url)
    block_bytes = check_block_size(parse_size(block_size))
    outer = Repository.enclosing(config.require_repo(), config.endpoint_url)
    if outer is not None:
        raise UsageError(f"{store.url} is inside the repository {outer}: refusing to init there "
                         "(its prune would delete the new repository's objects)")
    repo = Repository.init(store, block_bytes, compression_level)
    if json_output:
        emit_json({"repository": store.url, "id": repo.config.id,
                   "block_size": repo.block_size, "compression_level": compression_level})
    else:
        click.echo(f"created snapfs repository {repo.config.id} at {store.url}")


@click.command()
@click.argument("snap")
@click.argument("out")
@click.option("--force", is_flag=True, help="Replace OUT if it is an existing file.")
@click.option("--json", "json_output", is_flag=True, help="Print the result as JSON.")
@pass_config
def export(config: CliConfig, snap: str, out: str, force: bool, json_output: bool) -> None:
    """Write snapshot SNAP out as a raw image file (or onto a block device)."""
    from snapfs.mount import check_outside_repository
    from snapfs.repo.export import export_snapshot
    from snapfs.repo.repository import warn_unreadable

    # OUT's directory as it really is (the partial file goes there too), but not OUT's own
    # link: a symbolic link at OUT is replaced, not written through. (prune takes a file under
    # packs/ for a pack and counts it deleted; repair index calls it unreadable.)
    where, name = os.path.split(out)
    check_outside_repository(os.path.join(os.path.realpath(where or "."), name),
                             config.require_repo(), "export target")
    repo = config.open_repository()
    listing = repo.list_snapshots()
    try:
        root = repo.resolve(snap, listing)
    except SnapshotNotFound:
        from snapfs.cli.snapshot import refuse_unstored

        refuse_unstored(config, [snap], "export")
        raise
    warn_unreadable(listing.unreadable, repo.store.url, "left out")
    result = run_async(lambda p: export_snapshot(repo, root, out, force, p), json_output)
    if json_output:
        emit_json(result)
    else:
        click.echo(f"exported {root.name} ({root.id}) to {out}: {human_size(root.size)}")


@click.command()
@click.argument("snaps", nargs=-1, metavar="[SNAP]...")
@click.option("--json", "json_output", is_flag=True, help="Print the result as JSON.")
@pass_config
def verify(config: CliConfig, snaps: tuple[str, ...], json_output: bool) -> None:
    """Check that every block of SNAPs (default: all) is present and intact.

    A snapshot root that cannot be read is a problem too (if named, or without SNAPs)."""
    from snapfs.repo.repository import UnreadableRoot, warn_unreadable
    from snapfs.repo.verify import verify_snapshots

    repo = config.open_repository()
    listing = repo.list_snapshots()
    if snaps:  # a root that cannot be read is a problem if named, else a warning
        found = [repo.find(s, listing) for s in snaps]
        chosen = list({r.id: r for r in found if not isinstance(r, UnreadableRoot)}.values())
        bad = list({u.key: u for u in found if isinstance(u, UnreadableRoot)}.values())
        warn_unreadable([u for u in listing.unreadable if u not in bad], repo.store.url,
                        "not verified")
    else:
        chosen, bad = listing.roots, listing.unreadable
    report = run_async(lambda p: verify_snapshots(repo, chosen, p, bad), json_output)
    if json_output:
        emit_json(report.as_dict())
    else:
        for line in report.problems:
            click.echo(f"problem: {line}")
        if not snaps:  # (a named one is the error below)
            for snap_id in report.deleted:
                click.echo(f"not verified: snapshot {snap_id} was deleted meanwhile")
        click.echo(f"checked {counted(report.snapshots, 'snapshot')}, "
                   f"{counted(report.blobs_checked, 'blob')}, {human_size(report.bytes_checked)}: "
                   + ("no problems" if report.ok else counted(len(report.problems), "problem")))
    if not report.ok:
        raise SystemExit(IntegrityError.exit_code)
    if snaps and report.deleted:
        # the user asked for these: exit 0 would say they were checked (export says the same)
        raise SnapshotNotFound(f"not verified: snapshot {', '.join(report.deleted)} was "
                               "deleted while it was verified")


@click.command()
@click.option("--json", "json_output", is_flag=True, help="Print the result as JSON.")
@pass_config
def prune(config: CliConfig, json_output: bool) -> None:
    """Delete the blobs no snapshot uses (delete does this too) and repack sparse packs."""
    from snapfs.repo.gc import collect_garbage

    repo = config.open_repository()
    stats = run_async(lambda p: collect_garbage(repo, p), json_output)
    if json_output:
        emit_json(stats)
    else:
        click.echo(f"freed {human_size(stats['bytes_freed'])}: "
                   f"{counted(stats['packs_deleted'], 'pack')} deleted, "
                   f"{stats['packs_repacked']} repacked")


@click.group(cls=SubcommandGroup)
def repair() -> None:
    """Rebuild what can be rebuilt of a damaged repository (its index, from the packs; its
    packs, without their damaged blobs)."""


@repair.command("index")
@click.option("--read-all-packs", is_flag=True,
              help="Read the trailer of every pack, not only of those no index object names "
                   "(for an index object that can be read but is wrong).")
@click.option("--json", "json_output", is_flag=True, help="Print the result as JSON.")
@pass_config
def repair_index_(config: CliConfig, read_all_packs: bool, json_output: bool) -> None:
    """Rebuild the index from the packs' trailers: for index objects that were lost or damaged.

    The index only says where each blob is; every pack names its own blobs, so nothing the
    packs hold is lost with an index object. Index objects that cannot be read are replaced,
    packs no index names are added, packs that are gone are dropped. Then each snapshot is
    checked for blobs that no stored pack holds (exit 4 if one has any)."""
    from snapfs.repo.repair import repair_index, summary

    repo = config.open_repository()
    report = run_async(lambda p: repair_index(repo, read_all_packs, p), json_output)
    if json_output:
        emit_json(report.as_dict())
    else:
        for line in summary(report):
            click.echo(line)
    if report.incomplete:
        raise SystemExit(IntegrityError.exit_code)


@repair.command("packs")
@click.option("--json", "json_output", is_flag=True, help="Print the result as JSON.")
@pass_config
def repair_packs_(config: CliConfig, json_output: bool) -> None:
    """Read every pack and rewrite those holding damaged blobs without them.

    For blobs that verify reports damaged: while the index names them, a new snapshot of a
    source holding the same bytes refers to the damaged copies. Once they are gone, it stores
    those bytes again, and every snapshot that uses them reads whole again. Reads the whole
    repository. Exit 4 while a snapshot uses blobs no stored pack holds."""
    from snapfs.repo.repair import pack_summary, repair_packs

    repo = config.open_repository()
    report = run_async(lambda p: repair_packs(repo, p), json_output)
    if json_output:
        emit_json(report.as_dict())
    else:
        for line in pack_summary(report):
            click.echo(line)
    if report.incomplete or report.packs_unreadable:
        raise SystemExit(IntegrityError.exit_code)


@click.command()
@click.option("--all", "everything", is_flag=True,
              help="Also remove locks that are not stale yet, except those of live processes "
                   "on this host: for a host that died holding one.")
@click.option("--json", "json_output", is_flag=True, help="Print the result as JSON.")
@pass_config
def unlock(config: CliConfig, everything: bool, json_output: bool) -> None:
    """Remove stale repository locks (or, with --all, every lock not in use on this host)."""
    from snapfs.repo.lock import remove_locks

    repo = config.open_repository()  # a repository, not any directory
    removed, kept, unreadable = remove_locks(repo.store, everything)
    if json_output:
        emit_json({"removed": [i.as_dict() for i in removed], "kept": [i.as_dict() for i in kept],
                   "unreadable_removed": [k.removeprefix("locks/") for k in unreadable]})
        return
    for info in removed:
        click.echo(f"removed lock {info.key.removeprefix('locks/')}: {info.describe()}")
    for key in unreadable:
        click.echo(f"removed lock {key.removeprefix('locks/')}: unreadable (ignored by every "
                   "locker)")
    for info in kept:
        why = "in use on this host" if info.live_here else "not stale (use --all if its host died)"
        click.echo(f"kept lock {info.key.removeprefix('locks/')}: {info.describe()}, {why}")
    if not removed and not kept and not unreadable:
        click.echo("no locks")
