"""``snapfs snapshot …``: create, list, show, delete and forget (by a retention policy) snapshots."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from snapfs.cli.context import (
    CliConfig,
    SubcommandGroup,
    log_to_stderr,
    naming_the_disks_cache,
    not_empty,
    pass_config,
)
from snapfs.cli.keep import keep_options, policy_from
from snapfs.cli.output import (
    emit_json,
    human_size,
    local_time,
    printable,
    progress_for,
    run_async,
    table_lines,
)
from snapfs.errors import NotFoundError, NotMounted, SnapfsError, SnapshotNotFound, UsageError
from snapfs.format.names import (
    check_disk_label,
    check_snapshot_name,
    check_text,
    group_snapshot_names,
)
from snapfs.plural import counted
from snapfs.progress import NO_PROGRESS

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from snapfs.format.manifest import SnapshotRoot
    from snapfs.repo.repository import Repository, UnreadableRoot

#: seconds a command waits for a mount here to read the changed snapshots (``refresh_mounts``)
REFRESH_PATIENCE = 10.0


@click.group(cls=SubcommandGroup)
@click.pass_context
def snapshot(ctx: click.Context) -> None:
    """Create, list, show, delete and forget snapshots."""
    if ctx.invoked_subcommand != "create":  # create does, when it needs to
        log_to_stderr(ctx.obj.debug)


@snapshot.command()
@click.argument("source", required=False, callback=not_empty)
@click.option("--name", metavar="NAME",
              help="A unique name (default: DISK-YYYYMMDD-HHMMSS, local time); with several "
                   "--disk, each snapshot is named NAME-DISK.")
@click.option("--disk", "disks", multiple=True, metavar="NAME",
              help="Without SOURCE: a disk the running mount serves (repeat for a consistency "
                   "group). With SOURCE: the disk SOURCE is a snapshot of (default: its file "
                   "name).")
@click.option("--parent", metavar="SNAP",
              help="With SOURCE: the snapshot this one follows (default: the newest of the "
                   "same disk).")
@click.option("--freeze", "freeze", multiple=True, metavar="MOUNTPOINT",
              callback=not_empty,
              help="Served disks: freeze this file system (FIFREEZE) for the instant of "
                   "closing (repeatable).")
@click.option("--freeze-timeout", type=float, default=10.0, show_default=True, metavar="SECONDS",
              help="Thaw after this long and take a crash-consistent snapshot instead.")
@click.option("--no-wait", is_flag=True,
              help="Served disks: return once the snapshot is closed (it uploads meanwhile).")
@click.option("--tag", "tags", multiple=True, metavar="TAG", help="A tag to attach (repeatable).")
@click.option("--rate", type=float, metavar="MB/s", help="Cap upload throughput (10^6 bytes/s).")
@click.option("--json", "json_output", is_flag=True, help="Print the result as JSON.")
@pass_config
def create(config: CliConfig, source: str | None, name: str | None, disks: tuple[str, ...],
           parent: str | None, freeze: tuple[str, ...], freeze_timeout: float, no_wait: bool,
           tags: tuple[str, ...], rate: float | None, json_output: bool) -> None:
    """Snapshot SOURCE (an image file or block device: full the first time, then incremental),
    or, without SOURCE, the --disk disks the running mount serves (only their changed blocks)."""
    if rate is not None and not rate > 0:  # (nan too)
        raise UsageError("--rate must be a positive number of MB/s")
    for tag in tags:  # ("": an unset variable in `--tag "$TAG"`, most likely)
        check_text(tag, "--tag")
    for disk in disks:  # "" was taken as no --disk at all: the default label, silently
        check_disk_label(disk)
    if source is not None or freeze:
        log_to_stderr(config.debug)  # the library logs, and so does freezing; asking does not
    if source is None:
        _create_of_disks(config, list(disks), name, parent, freeze, freeze_timeout, no_wait,
                         tags, rate, json_output)
        return
    if len(disks) > 1:
        raise UsageError("with SOURCE, give at most one --disk (the label of its lineage)")
    # --freeze-timeout has a default: only one given on the command line is a mistake here
    timeout_given = click.get_current_context().get_parameter_source("freeze_timeout") \
        is click.core.ParameterSource.COMMANDLINE
    if freeze or no_wait or timeout_given:
        raise UsageError("--freeze, --freeze-timeout and --no-wait are for disks the mount "
                         "serves (no SOURCE)")
    if name is not None:
        check_snapshot_name(name)
    from snapfs.repo.create import CreateOptions, create_snapshot

    repo = config.open_repository()
    options = CreateOptions(name=name, disk=disks[0] if disks else None, parent=parent,
                            tags=tags, rate=rate * 1e6 if rate else None)
    result = run_async(lambda p: create_snapshot(repo, source, options, p), json_output)
    refresh_mounts(config)
    if json_output:
        emit_json(result.summary())
    else:
        click.echo(result.root.id)


def _create_of_disks(config: CliConfig, disks: list[str], name: str | None, parent: str | None,
                     freeze: tuple[str, ...], freeze_timeout: float, no_wait: bool,
                     tags: tuple[str, ...], rate: float | None, json_output: bool) -> None:
    from snapfs.write.client import snapshot_disks

    if not disks:
        raise UsageError("give a SOURCE image or device, or --disk NAME of a served disk")
    if parent or rate:
        raise UsageError("--parent and --rate are for SOURCE snapshots; a disk's snapshot "
                         "follows its last one")
    if not freeze_timeout > 0:  # (nan too)
        raise UsageError("--freeze-timeout must be positive")
    if name is not None:  # the daemon checks them too, but only after the freeze
        group_snapshot_names(name, disks)
    bar = progress_for(json_output)
    try:
        with naming_the_disks_cache(config):
            task = snapshot_disks(config.require_repo(), disks, name, list(tags), list(freeze),
                                  freeze_timeout, wait=not no_wait, progress=bar or NO_PROGRESS)
    finally:
        if bar is not None:
            bar.close()
    if json_output:
        emit_json(task)
    if task["state"] == "failed":
        raise SnapfsError(f"snapshot failed: {task['reason']}")
    if task["state"] == "progressing" and task.get("stuck") and not no_wait:
        names = ", ".join(part["name"] for part in task["parts"])
        raise SnapfsError(f"snapshot {names} is not stored: {task['stuck']} (snapfs snapshot "
                          "list shows how it goes)")
    if freeze and task["consistency"] == "crash":
        click.echo(f"warning: the file systems stayed frozen longer than {freeze_timeout:g} s "
                   "and were thawed: the snapshot is crash-consistent", err=True)
    if not json_output:
        for part in task["parts"]:
            click.echo(part["snapshot_id"] if task["state"] == "accomplished"
                       else f"{part['snapshot_id']} ({task['state']})")


@snapshot.command("list")
@click.option("--disk", metavar="DISK", help="Only snapshots of this disk.")
@click.option("--json", "json_output", is_flag=True, help="Print the result as JSON.")
@pass_config
def list_(config: CliConfig, disk: str | None, json_output: bool) -> None:
    """List snapshots, oldest first; snapshots of served disks still uploading (or failed) are
    listed too, with their state, and under the table why one failed (or why its upload is
    being retried)."""
    if disk is not None:  # (an unset variable: listed nothing, as if the disk had none)
        check_disk_label(disk)
    # the daemon's unfinished snapshots first, then the stored ones: an upload that ends in
    # between is then found stored (asked the other way round, it was in neither answer)
    unfinished = _unfinished(config)
    repo = config.open_repository()
    listing = repo.list_snapshots()
    _warn_unreadable(repo, listing.unreadable, "not listed")
    roots = [r for r in listing.roots if disk is None or r.disk == disk]
    docs = [_with_group(r, listing.roots, lambda: unfinished) for r in roots]
    stored = {r.id for r in roots}
    for doc in unfinished:
        if doc["id"] not in stored and (disk is None or doc["disk"] == disk):
            docs.append(doc)
    if json_output:
        emit_json(docs)
        return
    rows = [("ID", "NAME", "DISK", "SIZE", "CREATED", "STATE", "PARENT")]
    rows += [(d["id"], d["name"], d["disk"], human_size(d["size"]),
              local_time(d["created"]), d["state"], d["parent"] or "-") for d in docs]
    click.echo("\n".join(table_lines(rows)))
    # reasons are long (a store's error, a lock's holder): under the table, one line each
    notes = [_note(d) for d in docs
             if d.get("reason") and d["state"] in ("failed", "progressing", "incomplete")]
    if notes:
        click.echo("\n" + "\n".join(notes))


def _with_group(root: SnapshotRoot, roots: Sequence[SnapshotRoot],
                unfinished: Callable[[], list[dict[str, Any]]]) -> dict[str, Any]:
    """``root``'s summary; for a member of a consistency group, with how many of the group's
    snapshots are stored (``group_stored``, beside ``group_size``). A member whose group is
    not whole is not done: ``progressing`` while a daemon here still uploads the rest,
    ``incomplete`` if none does (its upload gave up after losing a disk's kept copy, or its
    daemon's state is gone, or a member was deleted since), with the reason. ``unfinished``
    gives the daemons' unfinished snapshots (``_unfinished``), asked only for such a member."""
    doc = root.summary()
    if root.group is None:
        return doc
    doc["group_stored"] = sum(1 for r in roots if r.group == root.group)
    if root.group_size is None or doc["group_stored"] >= root.group_size:
        return doc
    uploading = next((u for u in unfinished() if u["id"] == root.id), None)
    if uploading is not None:
        doc["state"], doc["reason"] = uploading["state"], uploading["reason"]
        if doc["state"] == "progressing":
            return doc
    doc["state"] = "incomplete"
    doc["reason"] = (f"only {doc['group_stored']} of the {root.group_size} snapshots of its "
                     f"consistency group {root.group} are stored")
    return doc


def _note(doc: dict[str, Any]) -> str:
    """Why snapshot ``doc`` (failed, incomplete, or progressing with a reason) is not stored
    (or not whole), in a line."""
    if doc["state"] == "failed":
        return f"snapshot {doc['name']} failed: {doc['reason']}"
    if doc["state"] == "incomplete":
        return (f"snapshot {doc['name']} is stored, but {doc['reason']}: it is consistent on "
                "its own, not with the other disks")
    if doc.get("read_by"):
        return (f"snapshot {doc['name']} cannot be stored: {doc['reason']}; it fails once no "
                f"disk reads from it (delete or roll back {', '.join(doc['read_by'])})")
    return f"snapshot {doc['name']} is retrying its upload, which failed: {doc['reason']}"


def _refuse_if_needed(config: CliConfig, repo: Repository, chosen: dict[str, str],
                      force: bool) -> None:
    """A snapshot that is needed may not be deleted: see ``_needed``. ``force`` overrides
    the holds of daemons that are not running here, never what a running daemon needs.
    ``chosen``: the snapshots to delete, id -> name (a root that cannot be read: its id)."""
    live = _needed_here(config)
    held = {} if force else _held(repo)
    for snap_id, name in chosen.items():
        reason = live.get(snap_id)
        if reason is not None and reason.startswith("open "):
            raise UsageError(f"snapshot {name} is {reason} (browsed or being read): "
                             "unbrowse or close it first")
        if reason is not None:
            raise UsageError(f"snapshot {name} is the {reason}: delete the disk (or roll it "
                             "back to another snapshot) first")
        reason = held.get(snap_id)
        if reason is not None:
            raise UsageError(f"snapshot {name} is the {reason}: delete that disk there "
                             "first (or, if that state is lost for good, --force)")


def _warn_unreadable(repo: Repository, unreadable: list[UnreadableRoot], consequence: str) -> None:
    if unreadable:
        from snapfs.repo.repository import warn_unreadable

        warn_unreadable(unreadable, repo.store.url, consequence)


def _needed(config: CliConfig, repo: Repository) -> dict[str, str]:
    """Every snapshot a disk or a reader needs, by id, with what needs it: what the daemons
    running here say (``_needed_here``), and the holds of every host's disks in the
    repository (``format.hold``: also while their daemon is not running)."""
    return {**_held(repo), **_needed_here(config)}


def _held(repo: Repository) -> dict[str, str]:
    held: dict[str, str] = {}
    for hold in repo.holds().values():
        for snap_id, reason in hold.snapshots.items():
            held.setdefault(snap_id, f"{reason} on {hold.host} ({hold.state})")
    return held


def _needed_here(config: CliConfig) -> dict[str, str]:
    """The snapshots that the snapfs daemons of this repository on this host need, by id, with
    what needs them. A served disk reads its untouched blocks from its base snapshot and makes
    its next snapshot from its parent's manifest; a snapshot image someone holds open (a
    browse's loop device, a copy) would turn into read errors under its reader. (Daemons on
    other hosts cannot be asked: their images fail to read once their blocks are gone.)"""
    from snapfs.control import repository_daemons, request

    needed: dict[str, str] = {}
    for files, _info in repository_daemons(config.require_repo()):
        try:
            held = request(files, {"op": "snapshots-open"}, timeout=10.0)["open"]
            disks = request(files, {"op": "disk-list"}, timeout=10.0)["disks"]
        except NotMounted:
            continue  # it ended meanwhile
        for snap_id, entry in held.items():
            needed.setdefault(snap_id, f"open at {files.mountpoint}/snapshots/{entry['name']}")
        for d in disks:
            for role in ("base", "parent"):
                if d.get(role):
                    needed.setdefault(d[role], f"{role} of disk {d['name']}")
    return needed


def refresh_mounts(config: CliConfig) -> None:
    """Tell the daemons on this host that mount the repository that its snapshots changed,
    and wait while they read them again: a new snapshot is in ``snapshots/`` when the command
    returns, and a deleted one is gone from it. A name a deleted snapshot leaves is known to
    the daemon and to the kernel, so nothing else asks again for up to 30 s (the sweep's
    refresh): a new snapshot given that name was served as the old image meanwhile. Daemons
    elsewhere see the change at their next refresh. Best effort: the change is made
    whatever a daemon answers."""
    from snapfs.control import repository_daemons, request

    try:  # (a runtime directory that cannot be used: no daemon to tell, and the change is made)
        daemons = repository_daemons(config.require_repo())
    except SnapfsError:
        return
    for files, _info in daemons:
        try:
            request(files, {"op": "refresh"}, timeout=REFRESH_PATIENCE)
        except SnapfsError:  # gone meanwhile, too slow, or the store failed it: it tries later
            continue


def refuse_unstored(config: CliConfig, snaps: Sequence[str], doing: str) -> None:
    """For a command that did not find one of ``snaps`` in the repository: the reason, if it
    names a snapshot of a served disk that is not stored (uploading, or failed); it is listed
    by ``snapshot list``, so "no snapshot" would mislead."""
    for doc in _unfinished(config):
        if doc["name"] in snaps or doc["id"] in snaps:
            raise UsageError(f"snapshot {doc['name']} is {doc['state']}, not stored: "
                             + (f"{doing} it once it is stored" if doc["state"] == "progressing"
                                else "it was never stored"))


def _unfinished(config: CliConfig) -> list[dict[str, Any]]:
    """Snapshots of served disks that are not stored: progressing, or failed (with why)."""
    from snapfs.control import disk_daemons, request

    tasks = []
    # (every daemon serving disks of the repository: mounts on different cache directories
    # each serve their own, and the disk commands refuse to choose, but listing must not)
    for files in disk_daemons(config.require_repo()):
        try:
            tasks += request(files, {"op": "tasks"}, timeout=10.0)["tasks"]
        except NotMounted:
            continue  # (it ended meanwhile)
    out = []
    for task in tasks:
        if task["state"] == "accomplished":
            continue
        for part in task["parts"]:
            if part["done"]:
                continue
            out.append({"id": part["snapshot_id"], "name": part["name"], "disk": part["disk"],
                        "parent": part["parent"], "size": part["size"],
                        "created": task["created"], "state": task["state"],
                        "reason": task["reason"], "read_by": task["read_by"],
                        "group": task["group"],
                        "tags": task["tags"], "blocks_changed": part["blocks"],
                        "progress": part.get("progress")})
    return out


@snapshot.command()
@click.argument("snap")
@click.option("--json", "json_output", is_flag=True, help="Print the result as JSON.")
@pass_config
def show(config: CliConfig, snap: str, json_output: bool) -> None:
    """Show one snapshot."""
    repo = config.open_repository()
    listing = repo.list_snapshots()
    try:
        root = repo.resolve(snap, listing)
    except SnapshotNotFound:
        refuse_unstored(config, [snap], "show")
        raise
    _warn_unreadable(repo, listing.unreadable, "left out")
    doc = _with_group(root, listing.roots, lambda: _unfinished(config))
    if json_output:
        emit_json(doc)
        return
    for key, value in doc.items():
        if isinstance(value, list):  # tags: as words, not as a Python list
            value = ", ".join(map(str, value))
        click.echo(f"{key + ':':18} {printable(str(value)) if value not in (None, '') else '-'}")


@snapshot.command()
@click.argument("snaps", nargs=-1, required=True, metavar="SNAP...")
@click.option("--force", is_flag=True,
              help="Delete even a snapshot that a disk whose daemon is not running here holds "
                   "(that disk can then no longer be read or snapshotted).")
@click.option("--json", "json_output", is_flag=True, help="Print the result as JSON.")
@pass_config
def delete(config: CliConfig, snaps: tuple[str, ...], force: bool, json_output: bool) -> None:
    """Delete snapshots and the blocks no other snapshot uses.

    A snapshot whose root cannot be read (damaged) is deleted by its id (or a unique prefix of
    it) as its object's key names it; while one is left, nothing else can be deleted, since
    garbage collection could not tell which blocks it needs."""
    from snapfs.repo.gc import delete_snapshots
    from snapfs.repo.repository import UnreadableRoot, refuse_unreadable

    repo = config.open_repository()
    listing = repo.list_snapshots()
    try:
        found = [repo.find(s, listing) for s in snaps]
    except SnapshotNotFound:
        refuse_unstored(config, snaps, "delete")
        raise
    chosen = {r.id: r for r in found if not isinstance(r, UnreadableRoot)}
    bad = {u.key: u for u in found if isinstance(u, UnreadableRoot)}
    others = [u for u in listing.unreadable if u.key not in bad]
    if others:
        raise refuse_unreadable(others, repo.store.url, "not deleting anything: garbage "
                                "collection cannot know which blocks that snapshot needs",
                                "try again")
    names = {**{u.snapshot_id: u.snapshot_id for u in bad.values()},
             **{i: r.name for i, r in chosen.items()}}
    _refuse_if_needed(config, repo, names, force)

    def recheck(roots: list[SnapshotRoot]) -> list[SnapshotRoot]:
        _refuse_if_needed(config, repo, names, force)  # again, locked
        return roots

    try:
        stats = run_async(lambda p: delete_snapshots(repo, list(chosen.values()), recheck,
                                                     unreadable=list(bad.values()), progress=p),
                          json_output)
    finally:  # (also after an error: the roots may be gone)
        refresh_mounts(config)
    if json_output:
        emit_json(stats)
    else:
        click.echo(f"deleted {counted(len(names), 'snapshot')}; freed {human_size(stats['bytes_freed'])}")


@snapshot.command()
@keep_options
@click.option("--disk", metavar="DISK",
              help="Only this disk's snapshots (default: every disk, each on its own).")
@click.option("-n", "--dry-run", is_flag=True, help="Say what would be forgotten; delete nothing.")
@click.option("--json", "json_output", is_flag=True, help="Print the result as JSON.")
@pass_config
def forget(config: CliConfig, disk: str | None, dry_run: bool, json_output: bool,
           **keep: Any) -> None:
    """Delete the snapshots a retention policy does not keep (and the blocks only they used).

    The policy is the --keep rules given, for every disk; without any, each disk's policy
    stored with `snapfs policy set` (a disk with none keeps all). Each disk's snapshots are
    judged on their own, newest first; a snapshot is kept if any rule keeps it, and so is the
    rest of its consistency group and any snapshot this host still needs (a served disk's base
    or parent, an image held open). Periods are counted in local time, and only those that
    have a snapshot: --keep-daily 30 keeps thirty days' last snapshots even if some days had
    none. --keep-within counts back from the disk's newest snapshot, not from now. While a
    snapshot root cannot be read, forget refuses (dry run too): delete that snapshot by its id,
    or put its root back, first."""
    from snapfs.repo.repository import refuse_unreadable
    from snapfs.repo.retention import decide, emptied_disks

    given = policy_from(**keep)
    if disk is not None:
        check_disk_label(disk)
    repo = config.open_repository()
    listing = repo.list_snapshots()
    if listing.unreadable:  # see README: counting without it could forget what it would keep
        raise refuse_unreadable(listing.unreadable, repo.store.url, "forget cannot tell which "
                                "disk and consistency group that snapshot belongs to, nor "
                                "collect garbage", "run forget again")
    roots = listing.roots
    if disk is not None and not any(r.disk == disk for r in roots):
        raise NotFoundError(f"no snapshots of disk {disk!r} in {repo.store.url}")
    if not given.empty():
        policy: Any = given
    else:
        default, per_disk = repo.retention_policies()
        if default is None and not per_disk:
            raise UsageError("forget needs --keep-… rules or a stored retention policy (snapfs "
                             "policy set); to delete snapshots by name, use snapshot delete")
        policy = {r.disk: per_disk.get(r.disk, default) for r in roots}
    decisions = decide(roots, policy, _needed(config, repo), only=disk)
    emptied = emptied_disks(decisions)  # a --keep-tag that matches nothing, most likely
    if emptied:
        name, count = min(emptied.items())
        what = "its only snapshot" if count == 1 else f"all {count} of its snapshots"
        raise UsageError(f"the retention policy keeps no snapshot of disk {printable(name)}: "
                         f"refusing to forget {what}; delete by name with snapshot delete")
    doomed = [d.root for d in decisions if not d.keep]
    stats: dict[str, Any] = {}
    if doomed and not dry_run:
        from snapfs.repo.gc import delete_snapshots

        by_id = {d.root.id: d for d in decisions}

        def recheck(roots: list[SnapshotRoot]) -> list[SnapshotRoot]:
            """What came to be needed since the decisions (a disk made from one of them) is
            kept after all, with why."""
            needed = _needed(config, repo)
            for root in roots:
                if root.id in needed:
                    by_id[root.id].reasons.append(needed[root.id])
            return [r for r in roots if r.id not in needed]

        try:
            stats = run_async(lambda p: delete_snapshots(repo, doomed, recheck,
                                                         "snapshot forget", progress=p),
                              json_output)
        finally:
            refresh_mounts(config)
        doomed = [d.root for d in decisions if not d.keep]
    if json_output:
        emit_json({"dry_run": dry_run,
                   "snapshots": [{"id": d.root.id, "name": d.root.name, "disk": d.root.disk,
                                  "created": d.root.created, "keep": d.keep,
                                  "reasons": d.reasons} for d in decisions],
                   "forgotten": [] if dry_run else [r.id for r in doomed], **stats})
        return
    rows = [("ACTION", "ID", "NAME", "DISK", "CREATED", "KEPT FOR")]
    rows += [("keep" if d.keep else "forget", d.root.id, d.root.name, d.root.disk,
              local_time(d.root.created), ", ".join(d.reasons) or "-")
             for d in decisions]
    click.echo("\n".join(table_lines(rows)))
    if not doomed:
        click.echo("nothing to forget: " + ("the one snapshot is kept" if len(decisions) == 1
                   else f"every one of {len(decisions)} snapshots is kept"))
    elif dry_run:
        click.echo(f"would forget {len(doomed)} of {counted(len(decisions), 'snapshot')} (dry run: "
                   "nothing deleted)")
    else:
        click.echo(f"forgot {len(doomed)} of {counted(len(decisions), 'snapshot')}; freed "
                   f"{human_size(stats['bytes_freed'])}")
