"""Snapshots of image files against a model: a long random history of changes to a few image
files, snapshots of them (incremental by default, or after a ``--parent`` of any snapshot; of
the file, or of a loop device over it), deletions, ``forget --keep-last`` (given, or from
policies stored with ``policy set``), prunes and refused commands, checked after each step.

The model is a ``bytearray`` per image file and a ``bytes`` per snapshot, with the disk label,
parent and creation order of each. The image files change only as the model says: unaligned
writes, zeros over data, a whole block of one byte, growing or shrinking by whole sectors, holes
punched with fallocate (sometimes over the whole file). Each snapshot's ``--json`` figures are
checked against what the model computes (blocks with data, zero blocks, blocks changed since its
parent, and the new blocks it may and must upload); ``export`` of a snapshot must give its
bytes, ``snapshot list`` exactly the model's snapshots, oldest first, and ``forget`` exactly the
model's choice. Bad input (a source that is no whole number of sectors, a parent or a snapshot
that is not there, a name taken, a rule of 0, an export over a file) must be one line and a
non-zero exit that changes nothing. At the end every snapshot is verified, exported, and a few
are read through a mount.

Each step is drawn from a seeded generator, so a failure names its seed, and runs again the
same way. ``test_disk_history.py`` does the same for disks the daemon serves. Retention rules
other than ``--keep-last`` count hours and days of a clock the test does not control, so the
model leaves them to ``test_retention.py``."""

from __future__ import annotations

import os
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mountutil import MOUNTS, attached, make_env, mounted
from testkit import EXIT_GENERAL, EXIT_NOT_FOUND, EXIT_USAGE, Snapfs, first_difference, one_error

pytestmark = MOUNTS
BS = 16 * 1024  # the repository's block size (snapfs init's default)
SECTOR = 512
STEPS = 60
#: disk labels that are no snapshot names as they are (a slash, a space, an accent)
LABELS = ("web", "db/main", "café data")


def punch_hole(path: Path, offset: int, length: int) -> None:
    """A hole where ``path`` had bytes ``offset`` .. ``offset + length`` (the file keeps its
    size; partial blocks at either end are zeroed): what a TRIM passed through does."""
    subprocess.run(["fallocate", "--punch-hole", "--offset", str(offset), "--length",
                    str(length), str(path)], check=True)


def blocks(data: bytes) -> list[bytes | None]:
    """The blocks of ``data`` as the repository stores them: None for a zero block (any
    length), else its bytes (a short last block differs from the same bytes padded)."""
    out: list[bytes | None] = []
    for off in range(0, len(data), BS):
        block = data[off : off + BS]
        out.append(None if block.count(0) == len(block) else block)
    return out


@dataclass
class Snap:
    id: str
    label: str
    parent: str | None  # an id: a parent deleted since is still named
    content: bytes


class History:
    """The image files and snapshots as the model says they are, and the steps on both."""

    def __init__(self, snapfs: Snapfs, rng: random.Random, tmp: Path) -> None:
        self.snapfs = snapfs
        self.rng = rng
        self.tmp = tmp
        self.images: dict[str, bytearray] = {}
        self.paths: dict[str, Path] = {}
        self.snaps: dict[str, Snap] = {}  # by name, oldest first
        self.policies: dict[str | None, int] = {}  # stored: disk (None: default) -> keep last
        # every block any snapshot stored: a block no snapshot has any more may still be held
        # by a pack that was not collected, so a new snapshot may or may not upload it again
        self.ever_stored: set[bytes] = set()
        self.count = 0
        self.log: list[str] = []

    def note(self, what: str) -> None:
        self.log.append(what)

    def history(self) -> str:
        return "history:\n  " + "\n  ".join(self.log)

    def add_image(self, label: str) -> None:
        path = self.tmp / f"image{len(self.paths)}.img"
        palette = [bytes(BS)] + [self.rng.randbytes(BS) for _ in range(4)]
        size = self.rng.randrange(4 * BS, 48 * BS, SECTOR)
        data = b"".join(self.rng.choice(palette) for _ in range(-(-size // BS)))[:size]
        path.write_bytes(data)
        self.images[label] = bytearray(data)
        self.paths[label] = path
        self.note(f"image {label!r}: {size} bytes")

    def fresh(self) -> str:
        self.count += 1
        return f"s{self.count}"

    # -- changes to an image file (no snapfs in them) ------------------------------------------

    def change(self) -> None:
        label = self.rng.choice(LABELS)
        model, path = self.images[label], self.paths[label]
        size = len(model)
        kind = self.rng.choice(["write", "write", "zeros", "repeat", "grow", "shrink", "punch"])
        if kind in ("write", "zeros", "repeat"):
            if kind == "repeat":  # a whole block of one byte: the same block in other images
                offset = self.rng.randrange(0, -(-size // BS)) * BS
                data = bytes([self.rng.choice([0x55, 0xAA])]) * min(BS, size - offset)
            else:
                offset = self.rng.randrange(0, size)
                length = min(size - offset, self.rng.choice(
                    [1, 17, BS - 1, BS + 1, self.rng.randrange(1, 3 * BS)]))
                data = bytes(length) if kind == "zeros" else self.rng.randbytes(length)
            with open(path, "r+b") as f:
                f.seek(offset)
                f.write(data)
            model[offset : offset + len(data)] = data
            self.note(f"{kind} {label!r} {offset}+{len(data)}")
        elif kind == "grow":
            grown = size + SECTOR * self.rng.randrange(1, 3 * BS // SECTOR)
            os.truncate(path, grown)
            model.extend(bytes(grown - size))
            self.note(f"grow {label!r} to {grown}")
        elif kind == "shrink":
            shrunk = self.rng.randrange(1, size // SECTOR + 1) * SECTOR
            os.truncate(path, shrunk)
            del model[shrunk:]
            self.note(f"shrink {label!r} to {shrunk}")
        else:
            if self.rng.random() < 0.15:  # the whole file: nothing but a hole is left
                offset, length = 0, size
            else:
                offset = self.rng.randrange(0, size)
                length = min(size - offset, self.rng.randrange(1, 4 * BS))
            punch_hole(path, offset, length)
            model[offset : offset + length] = bytes(length)
            self.note(f"punch {label!r} {offset}+{length}")
        assert path.stat().st_size == len(model)

    # -- snapfs commands -----------------------------------------------------------------------

    def newest(self, label: str) -> Snap | None:
        mine = [s for s in self.snaps.values() if s.label == label]
        return mine[-1] if mine else None

    def snapshot(self) -> None:
        label = self.rng.choice(LABELS)
        content = bytes(self.images[label])
        args: list[Any] = ["snapshot", "create", self.paths[label], "--disk", label]
        parent = self.newest(label)
        if self.snaps and self.rng.random() < 0.3:  # an older one, or another image's
            chosen = self.rng.choice(sorted(self.snaps))
            parent = self.snaps[chosen]
            args += ["--parent", self.rng.choice([chosen, parent.id])]
        name = None
        if self.rng.random() < 0.7:
            name = self.fresh()
            args += ["--name", name]
        if self.rng.random() < 0.15:  # the same file as a block device: no holes, no mtime
            with attached(self.paths[label], read_only=True) as device:
                args[2] = device
                made = self.snapfs.json(*args)
        else:
            made = self.snapfs.json(*args)
        if name is None:  # DISK-YYYYMMDD-HHMMSS, a slash of the label made '_'
            assert made["name"].startswith(label.replace("/", "_") + "-"), made["name"]
            assert made["name"] not in self.snaps, (made["name"], self.history())
        where = f"snapshot {made['name']} of {label!r}; {self.history()}"
        assert (made["disk"], made["size"]) == (label, len(content)), where
        assert made["parent"] == (parent.id if parent else None), where
        new = blocks(content)
        zeros = new.count(None)
        assert (made["blocks_total"], made["blocks_zero"], made["blocks_data"]) \
            == (len(new), zeros, len(new) - zeros), (made, where)
        if parent is None:
            assert "blocks_changed" not in made, where
        else:
            old = blocks(parent.content)
            old += [None] * (len(new) - len(old))
            changed = sum(1 for a, b in zip(new, old, strict=False) if a != b)
            assert made["blocks_changed"] == changed, (made, where)
        # what it must upload (blocks never stored), and may (also those no snapshot has now)
        kept = {b for s in self.snaps.values() for b in blocks(s.content) if b is not None}
        distinct = {b for b in new if b is not None}
        assert len(distinct - self.ever_stored) <= made["blocks_uploaded"] \
            <= len(distinct - kept), (made, where)
        self.ever_stored |= distinct
        self.snaps[made["name"]] = Snap(made["id"], label, made["parent"], content)
        self.note(f"snapshot {label!r}{' (loop device)' if args[2] != self.paths[label] else ''} "
                  f"as {made['name']} (parent {parent.id if parent else None})")

    def export(self, name: str | None = None) -> None:
        if not self.snaps:
            return
        name = name or self.rng.choice(sorted(self.snaps))
        snap = self.snaps[name]
        out = self.tmp / "export.img"
        self.snapfs.ok("export", self.rng.choice([name, snap.id]), out, "--force")
        got = out.read_bytes()
        if got != snap.content:
            bad = first_difference(got, snap.content)
            raise AssertionError(f"export of {name} ({len(got)} bytes, modelled "
                                 f"{len(snap.content)}) differs from byte {bad}; "
                                 + self.history())
        # sparse: no more is allocated than its data blocks (and a block of ext4's extent tree
        # for a file of many extents)
        data_blocks = sum(1 for b in blocks(snap.content) if b is not None)
        assert out.stat().st_blocks * 512 <= (data_blocks + 1) * BS, (name, self.history())
        out.unlink()
        self.note(f"export {name}")

    def listing(self) -> None:
        label = self.rng.choice([None, *LABELS])
        args: list[Any] = ["snapshot", "list"] + (["--disk", label] if label else [])
        listed = [(d["name"], d["id"], d["disk"], d["size"], d["parent"], d["state"])
                  for d in self.snapfs.json(*args)]
        modelled = [(name, s.id, s.label, len(s.content), s.parent, "accomplished")
                    for name, s in self.snaps.items() if label is None or s.label == label]
        assert listed == modelled, f"{listed} (oldest first); {self.history()}"

    def delete(self) -> None:
        if len(self.snaps) < 2:
            return
        names = self.rng.sample(sorted(self.snaps), self.rng.choice([1, 1, 2]))
        out = self.snapfs.ok("snapshot", "delete",
                             *[self.rng.choice([n, self.snaps[n].id]) for n in names])
        assert out.startswith(f"deleted {len(names)} snapshot"), out
        for name in names:
            del self.snaps[name]
        self.note(f"delete {names}")

    def policy(self) -> None:
        """Store a ``--keep-last`` policy for one disk or for all, or delete one."""
        label = self.rng.choice([None, *LABELS])  # None: the default for every disk
        whose = ["--disk", label] if label is not None else []
        if self.rng.random() < 0.3:
            result = self.snapfs("policy", "delete", *whose)
            if label in self.policies:
                assert result.returncode == 0, (result.stderr, self.history())
                del self.policies[label]
            else:
                assert "no retention policy" in one_error(result, EXIT_NOT_FOUND)
            self.note(f"policy delete {label!r}")
        else:
            self.policies[label] = self.rng.choice([1, 2, 3])
            self.snapfs.ok("policy", "set", "--keep-last", self.policies[label], *whose)
            self.note(f"policy set {label!r}: keep last {self.policies[label]}")
        shown = self.snapfs.json("policy", "show")
        default = self.policies.get(None)
        assert shown == {"default": {"last": default} if default else None,
                         "disks": {d: {"last": n} for d, n in self.policies.items()
                                   if d is not None}}, shown

    def forget(self) -> None:
        label = self.rng.choice([None, *LABELS])  # None: every disk, each on its own
        args: list[Any] = ["snapshot", "forget"] + (["--disk", label] if label else [])
        if self.rng.random() < 0.5:
            keep: dict[str, int | None] = dict.fromkeys(LABELS, self.rng.choice([1, 1, 2, 3]))
            args += ["--keep-last", keep[LABELS[0]]]
        else:  # by the stored policies: a disk's own, else the default, else none (keep all)
            keep = {each: self.policies.get(each, self.policies.get(None)) for each in LABELS}
        dry = self.rng.random() < 0.2
        judged = [n for n, s in self.snaps.items() if label is None or s.label == label]
        if not judged and label is not None:  # nothing of that disk: said, nothing touched
            result = self.snapfs(*args)
            assert "no snapshots of disk" in one_error(result, EXIT_NOT_FOUND)
            self.note(f"forget of {label!r}: none")
            return
        if "--keep-last" not in args and not self.policies:
            assert "needs --keep" in one_error(self.snapfs(*args), EXIT_USAGE)
            self.note(f"forget of {label!r}: no rules, no policy")
            return
        doomed = []  # all but the newest N of each disk that has an N
        for each in LABELS:
            mine = [n for n in judged if self.snaps[n].label == each]
            last = keep[each]
            doomed += mine[: max(0, len(mine) - last)] if last is not None else []
        report = self.snapfs.json(*args, *(["--dry-run"] if dry else []))
        decided = {d["name"]: d["keep"] for d in report["snapshots"]}
        assert decided == {n: n not in doomed for n in judged}, (report, self.history())
        forgotten = [] if dry else sorted(self.snaps[n].id for n in doomed)
        assert sorted(report["forgotten"]) == forgotten, (report, self.history())
        if not dry:
            for name in doomed:
                del self.snaps[name]
        self.note(f"forget {' '.join(map(str, args[2:]))}{' (dry run)' if dry else ''}: "
                  f"{doomed}")

    def prune(self) -> None:
        self.snapfs.ok("prune")
        self.note("prune")

    def refused(self) -> None:
        """Bad input: one line, a non-zero exit, and the repository as it was."""
        label = self.rng.choice(LABELS)
        path, model = self.paths[label], self.images[label]
        kind = self.rng.choice(["odd size", "no parent", "name taken", "no rule",
                                "no snapshot", "export over a file"])
        if kind == "odd size":
            os.truncate(path, len(model) + self.rng.randrange(1, SECTOR))
            result = self.snapfs("snapshot", "create", path, "--disk", label)
            os.truncate(path, len(model))
            assert "not a multiple of 512" in one_error(result, EXIT_GENERAL), self.history()
        elif kind == "no parent":
            result = self.snapfs("snapshot", "create", path, "--disk", label,
                                 "--parent", "nosuchsnapshot")
            assert "nosuchsnapshot" in one_error(result, EXIT_NOT_FOUND)
        elif kind == "name taken" and self.snaps:
            name = self.rng.choice(sorted(self.snaps))
            result = self.snapfs("snapshot", "create", path, "--disk", label, "--name", name)
            assert "already exists" in one_error(result, EXIT_GENERAL)
        elif kind == "no rule":
            result = self.snapfs("snapshot", "forget", "--keep-last", "0", "--disk", label)
            one_error(result, EXIT_USAGE)
        elif kind == "no snapshot":
            result = self.snapfs("snapshot", "delete", *sorted(self.snaps)[:1], "nosuchsnapshot")
            assert "nosuchsnapshot" in one_error(result, EXIT_NOT_FOUND)
        elif self.snaps:  # an export never replaces a file unless told to
            out = self.tmp / "precious.img"
            out.write_bytes(b"keep me")
            result = self.snapfs("export", self.rng.choice(sorted(self.snaps)), out)
            assert "exists" in one_error(result, EXIT_GENERAL)
            assert out.read_bytes() == b"keep me"
        self.note(f"refused: {kind} ({label!r})")
        self.listing()


def test_a_random_history_of_image_snapshots_matches_its_model(
        store_url: str, store_endpoint: str | None, tmp_path: Path, runtime_dir: Path,
        request: pytest.FixtureRequest) -> None:
    s3 = store_url.startswith("s3://")
    # a history of its own for each store; both snapshot an image punched whole against a
    # parent that had data (its blocks_changed was 0)
    seed = 418 if s3 else 23
    rng = random.Random(seed)
    snapfs = Snapfs(store_url, store_endpoint, make_env(runtime_dir, request, s3))
    snapfs.ok("init")
    history = History(snapfs, rng, tmp_path)
    for label in LABELS:
        history.add_image(label)
    steps = [("change", 30), ("snapshot", 12), ("export", 5), ("listing", 3), ("delete", 3),
             ("forget", 3), ("policy", 1), ("prune", 1), ("refused", 2)]
    kinds = [k for k, _ in steps]
    weights = [w for _, w in steps]
    for _ in range(STEPS):
        getattr(history, rng.choices(kinds, weights)[0])()
    history.listing()
    snapfs.ok("verify")
    for name in list(history.snaps):
        history.export(name)
    # and read through a mount: each image as the model has it
    with mounted(snapfs, tmp_path / "mnt", tmp_path / "cache") as daemon:
        served = {p.name.removesuffix(".img") for p in daemon.images.iterdir()}
        assert served == set(history.snaps), history.history()
        for name in rng.sample(sorted(history.snaps), min(4, len(history.snaps))):
            got = (daemon.images / f"{name}.img").read_bytes()
            assert got == history.snaps[name].content, f"{name} as mounted; {history.history()}"
