"""A seeded fuzz of the real ``snapfs`` command with bad and odd arguments.

The promise: bad input gets one clear line and a non-zero exit, and never costs data. Argument
vectors are drawn from the CLI's own click definitions (every command, its arguments and
options, their types), so a new command or option is fuzzed without a change here; each
parameter's values come from a pool chosen by what the parameter is (a snapshot, a name, a
size, a rate, a path to read or to write, ...), valid-looking and bad ones mixed. Each vector
runs as a real process against a small local repository, and for every one:

- no traceback, on either stream, and no hang (a timeout fails the test);
- the exit code is 0 or one that README.md documents;
- a failure says so in exactly one line on stderr, starting ``snapfs: `` (a mistake on the
  command line too: snapfs turns click's four-line usage report into one line, exit 2);
- a vector holding a value that cannot be right (an empty name, a size of "12Q", an unknown
  snapshot, a missing required argument, ...) fails;
- the repository is unchanged, byte for byte, unless the command writes and succeeded, and no
  lock, mount, loop device or daemon is left behind.

``SNAPFS_FUZZ_SEEDS`` runs other seeds by hand: ``7``, ``0-199`` or ``1,5,9``;
``SNAPFS_FUZZ_VECTORS`` and ``SNAPFS_FUZZ_MOUNT_VECTORS`` set how many vectors each seed draws
(without and beside a running mount). A failure lists every vector of the seed that failed,
each with its command line, exit code and output.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from diskimages import MiB, have_root, random_image, release_fifo_reader
from mountutil import loops_under, mounted, mounts_under, pid_running, wait_for
from testkit import SNAPFS, Snapfs, store_env

from snapfs.cli import cli

#: every exit code README.md documents
DOCUMENTED_EXITS = {0, 1, 2, 3, 4, 5, 6, 130}
#: the commands that may change what a repository holds when they succeed; any other command
#: that changes it fails the test (so a new writing command must be named here)
WRITERS = {"init", "snapshot create", "snapshot delete", "snapshot forget", "prune",
           "repair index", "repair packs", "unlock", "policy set", "policy delete",
           "disk create", "disk delete", "disk rollback"}
#: the commands that run a mount daemon, which stores the access profile of each image read
#: (``profiles/ID``: hints of what to fetch first, not data) when it stops, as README says:
#: they may change ``profiles/`` whether they succeed or not
STORE_PROFILES = {"mount", "browse", "restore-files"}
#: the commands that need a running mount of the repository to do anything (fuzzed beside one
#: in ``test_fuzz_the_commands_of_a_running_mount``; without one they fail at once, which the
#: main fuzz checks too)
NEED_A_MOUNT = {"disk create", "disk delete", "disk rollback", "disk list", "stats"}
#: seconds a vector may run: none of them has work to do that takes more than a few
TIMEOUT = 60


def _seeds() -> list[int]:
    spec = os.environ.get("SNAPFS_FUZZ_SEEDS", "0")
    seeds: list[int] = []
    for part in spec.split(","):
        first, _, last = part.partition("-")
        seeds += range(int(first), int(last or first) + 1)
    return seeds


SEEDS = _seeds()
VECTORS = int(os.environ.get("SNAPFS_FUZZ_VECTORS", "120"))

#: the fuzz needs root: a read-only tmpfs, and the mounts, browses and loop devices it makes
needs_root = pytest.mark.skipif(not have_root() or not os.path.exists("/dev/fuse"),
                                reason="needs root (a read-only tmpfs, mounts, loop devices)")

Token = str | bytes


@dataclasses.dataclass(frozen=True)
class Value:
    """A value drawn for a parameter; ``bad`` when it cannot be right for that parameter
    (then the command must fail), else it may or may not be."""

    token: Token
    bad: bool = False


def ok(*tokens: Token) -> list[Value]:
    return [Value(t) for t in tokens]


def bad(*tokens: Token) -> list[Value]:
    return [Value(t, True) for t in tokens]


# -- the world the vectors run in ------------------------------------------------------------


@dataclasses.dataclass
class World:
    tmp: Path
    repo: Path
    pristine: Path
    snapfs: Snapfs
    snapshots: list[dict[str, Any]]
    source: Path
    read_only: Path  # a read-only tmpfs with a file and an empty directory in it
    runtime: Path
    cache: Path
    served: Path | None = None  # a mount of the repository that vectors may name
    scratches: list[Path] = dataclasses.field(default_factory=list)  # made for the next vector

    def kept_mounts(self) -> set[str]:
        """The mounts the vectors run among, which they must leave as they are."""
        return {str(self.read_only), *([str(self.served)] if self.served else [])}

    def scratch(self) -> Path:
        """A new directory of its own for one vector's paths."""
        path = self.tmp / "v" / uuid.uuid4().hex[:8]
        path.mkdir(parents=True)
        self.scratches.append(path)
        return path


def small_ext4(out: Path) -> Path:
    """A 2 MiB ext4 image of a few files (``etc/a.txt``, ``var/b.bak``)."""
    tree = out.with_suffix(".tree")
    for name in ("etc/a.txt", "var/b.bak"):
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text(name)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "1024", "-d", str(tree), str(out), "2M"],
                   check=True, capture_output=True)
    return out


def repository_state(repo: Path) -> dict[str, bytes]:
    """Every file of a local repository (temporary ones too) and its bytes, but its locks."""
    return {str(p.relative_to(repo)): p.read_bytes() for p in sorted(repo.rglob("*"))
            if p.is_file() and p.relative_to(repo).parts[0] != "locks"}


def tree_state(roots: list[Path]) -> dict[str, bytes | str]:
    """What is under ``roots``: each file's bytes, each link's target, each other entry's
    kind; to show that a command that failed left the user's files as they were."""
    state: dict[str, bytes | str] = {}
    for root in roots:
        for path in [root, *root.rglob("*")]:
            if path.is_symlink():
                state[str(path)] = f"-> {os.readlink(path)}"
            elif path.is_file():
                state[str(path)] = path.read_bytes()
            else:
                state[str(path)] = "dir" if path.is_dir() else "other"
    return state


def locks_left(repo: Path) -> list[str]:
    return sorted(p.name for p in (repo / "locks").glob("*")) if (repo / "locks").exists() else []


def restore_repository(world: World) -> None:
    shutil.rmtree(world.repo)
    shutil.copytree(world.pristine, world.repo, symlinks=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest,
          runtime_dir: Path) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("fuzz")
    repo = tmp / "repo"
    env = {**store_env(request, s3=False), "SNAPFS_RUNTIME_DIR": str(runtime_dir),
           "SNAPFS_CACHE_DIR": str(tmp / "cache")}
    snapfs = Snapfs(str(repo), None, env)
    snapfs.ok("init", "--block-size", "4K")
    source = random_image(tmp / "source.img", MiB // 4, seed=1)
    snapshots = [
        snapfs.json("snapshot", "create", source, "--name", "alpha", "--disk", "disk-a"),
        snapfs.json("snapshot", "create", random_image(tmp / "b.img", MiB // 4, seed=2),
                    "--name", "beta", "--disk", "disk-b", "--tag", "t1"),
        # (a label and a tag may hold control characters: every message must escape them)
        snapfs.json("snapshot", "create", source, "--name", "gamma", "--disk", "two\nlines",
                    "--tag", "tab\there"),
        # (a file system, so that browse and restore-files get past finding one)
        snapfs.json("snapshot", "create", small_ext4(tmp / "fs.img"), "--name", "fs"),
    ]
    pristine = tmp / "repo.pristine"
    shutil.copytree(repo, pristine, symlinks=True)
    read_only = tmp / "ro"
    read_only.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(read_only)], check=True)
    try:
        (read_only / "file.img").write_bytes(b"\0" * 4096)
        (read_only / "empty").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(read_only)], check=True)
        yield World(tmp, repo, pristine, snapfs, snapshots, source, read_only, runtime_dir,
                    tmp / "cache")
    finally:
        subprocess.run(["umount", "--lazy", str(read_only)], check=True)


# -- what each parameter is given ------------------------------------------------------------

NOT_UTF8 = b"x\xff\xfey"
ODD_TEXT = [*ok("x", "-", "*", "?", "%s", "{}", " x ", "snäp", "a b"),
            *ok("a/b", "..", ".", "/", "\x01x", "x\ty", "x\ny", "x" * 300, NOT_UTF8)]


def snapshot_refs(world: World) -> list[Value]:
    alpha, beta, _, _ = world.snapshots
    return [*ok("alpha", beta["id"], beta["id"][:6], alpha["id"][:4], "fs", "gamma"),
            *bad("nosuch", "", alpha["id"][:3], "/", "..", f"../{alpha['id']}",
                 f"snapshots/{alpha['id']}", "alpha/", "x" * 300, "\x01", NOT_UTF8,
                 alpha["id"].upper(), f"{alpha['id']} ", f"{alpha['id']}0", "*", "alph?")]


def snapshot_names() -> list[Value]:
    return [*ok("fuzz-new", "snäp 1", "-x", "a" * 200, "with space", "x*y"),
            *bad("", ".hidden", "..", "a/b", "/", "x\x07y", "x\ny", "a" * 201, "ä" * 101,
                 NOT_UTF8, "alpha")]  # (alpha: taken)


def disk_names() -> list[Value]:
    return [*ok("web1", "a.b_c-d", "x" * 100),
            *bad("", ".x", "_x", "-x", "a/b", "..", "x" * 101, "ä", "a b", NOT_UTF8, "x\n")]


def labels() -> list[Value]:
    """A disk's label (``--disk`` of a SOURCE snapshot, of a listing, of forget, of policies):
    any non-empty text. Text that is not UTF-8 cannot be stored as text (a JSON document)."""
    return [*ok("disk-a", "disk-b", "other", "a/b", "x\ny", "..", "x" * 150),
            *bad("", NOT_UTF8)]


def tags() -> list[Value]:
    return [*ok("t1", "t2", "x\ny", "a b", "x" * 300, "-"), *bad("", NOT_UTF8)]


SIZES = [*ok("16K", "4K", "1M", "64K", " 4k ", "1.5M", "0", "1", "4096", "1T", "4MiB",
             "18446744073709551616", "0.1"),
         *bad("-1", "", "1e400", "nan", "12Q", "16K7", "9" * 40, "K", "1.", "inf", "0x10",
              "4 K B", NOT_UTF8)]
FLOAT_RATES = [*ok("1", "0.5", "100", "inf", "1e400", "1e-300"),
               *bad("0", "-1", "nan", "", "12Q", "-inf", "1,5", NOT_UTF8)]
SECONDS = [*ok("1", "0.5", "30", "inf", "1e-300"),
           *bad("0", "-1", "nan", "", "12Q", "-inf", "1s", NOT_UTF8)]
RETENTION_SPANS = [*ok("30d", "1y6m", "12h", "2w", "1Y", " 3d ", "0d", "9999999y"),
                   *bad("", "-1d", "nan", "30", "d", "1y1y", "99999999d", "1.5d", "1e400",
                        "3x", "1d 2h", NOT_UTF8)]
LATENCIES = [*ok("20ms", "0.5s", "250us", "1"),
             *bad("0", "-1ms", "nan", "", "12Q", "1e400", "20 min", "3600s", "99999999999s",
                  "9" * 400, NOT_UTF8)]
BANDWIDTHS = [*ok("100MB/s", "1.5GB/s", "50MiB/s", "10"),
              *bad("-1", "nan", "", "12Q", "1e400", "fast", NOT_UTF8)]
GLOBS = [*ok("etc", "**", "*.txt", "etc/**", "a\\*b", "[1]", "**/x", "/etc", "a//b"),
         *ok("[", "\\", "a\\", "[!]", "..", "../x", "x" * 300, NOT_UTF8)]


def path_values(world: World, role: str) -> list[Value]:
    """Paths for a parameter with ``role``: made afresh in a scratch directory, so that what
    one vector did to them (an export over a file, an init in a directory) cannot change what
    another's mean."""
    here = world.scratch()
    (here / "file").write_bytes(os.urandom(8192))
    (here / "empty").write_bytes(b"")
    (here / "odd").write_bytes(os.urandom(1000))
    (here / "emptydir").mkdir()
    (here / "fulldir").mkdir()
    (here / "fulldir" / "x").write_text("x")
    os.mkfifo(here / "fifo")  # (opened for reading, it waits for a writer)
    (here / "loop").symlink_to("loop")
    missing, file, emptydir, fulldir = (here / "missing", here / "file", here / "emptydir",
                                        here / "fulldir")
    fifo, loop = str(here / "fifo"), str(here / "loop")
    under_file = file / "x"
    in_repo = world.repo / "packs" / "x"
    ro_file, ro_dir = world.read_only / "file.img", world.read_only / "empty"
    common = bad("", str(under_file), str(missing / "deeper" / "x"), loop, fifo)
    if role == "source":  # an image to read
        return [*ok(str(world.source), str(file)),
                *common, *bad(str(missing), str(emptydir), str(here / "empty"), str(here / "odd"),
                              "/dev/null", "/dev/zero", str(world.repo / "config"), "-",
                              str(world.source) + "/.")]
    if role == "out":  # a file to write
        return [*ok(str(here / "new.img"), str(here / "sub\nline.img"), str(file),
                    os.fsencode(str(here)) + b"/\xff.img", "/dev/null"),
                *common, *bad(str(emptydir), str(fulldir), str(ro_file), str(ro_dir / "x.img"),
                              str(in_repo), str(world.repo), "-", str(here / ("x" * 300)),
                              "/dev/full", "/")]
    if role == "new-mountpoint":  # an empty directory to mount on
        return [*ok(str(emptydir), str(ro_dir)),
                *common, *bad(str(missing), str(file), str(fulldir), str(world.repo / "packs"),
                              str(world.repo), "/", str(world.read_only))]
    if role == "mounted":  # a mount (or browse) of snapfs: only the served one, if any
        return [*ok(*([str(world.served)] if world.served else [])),
                *bad(str(missing), str(file), str(emptydir), str(fulldir), str(world.read_only),
                     "", str(under_file), str(world.repo), "x" * 300, "/nonexistent/../tmp",
                     *([str(world.served / "snapshots")] if world.served else []))]
    if role == "target":  # a directory to write into, made if missing
        return [*ok(str(missing), str(emptydir), str(fulldir), str(missing / "deeper")),
                *bad("", str(under_file), loop, fifo,str(file), str(ro_dir), str(ro_dir / "x"), str(in_repo),
                                  str(world.repo), str(here / ("x" * 300)))]
    if role == "list-file":  # a file to read lines from
        (here / "list").write_text("alpha.img\nbeta.img 0 4K\n# a comment\n")
        (here / "garbage").write_bytes(b"\xff\xfe\0zzz 1 2 3 4\n")
        return [*ok(str(here / "list"), str(here / "empty")),
                *bad(str(missing), str(emptydir), "", str(under_file), str(here / "garbage"),
                     fifo, loop, "/dev/zero")]
    raise AssertionError(role)


def int_values(param: click.Parameter) -> list[Value]:
    low = getattr(param.type, "min", None)
    ints = ["1", "3", "22", "0", "-1", "-7", "-8", "23", str(2**63), "9" * 30]
    values = [Value(n, low is not None and int(n) < low) for n in ints]
    return values + bad("", "1.5", "nan", "0x10", "one", NOT_UTF8)


def values_for(world: World, command: str, param: click.Parameter) -> list[Value]:
    """The pool a parameter draws from, chosen by what click says it is (its type, name and
    metavar); a text parameter this does not know gets odd text, none of it known to be bad."""
    name, metavar, kind = param.name or "", (param.metavar or "").upper(), param.type
    if isinstance(kind, click.Choice):
        return [*ok(*map(str, kind.choices)),
                *bad("", "merge", str(kind.choices[0]).upper(), "*")]
    if isinstance(kind, click.types.IntParamType):
        return int_values(param)
    if isinstance(kind, click.types.FloatParamType):
        return FLOAT_RATES if "/S" in metavar else SECONDS
    if name in ("snap", "snaps", "parent") or metavar == "SNAP":
        return snapshot_refs(world)
    if command == "snapshot create" and name == "name":
        return snapshot_names()
    if command.startswith("disk ") and name == "name":
        return disk_names()
    if name in ("disk", "disks"):
        return labels()
    if name in ("tags", "keep_tags"):
        return tags()
    if metavar == "SIZE":
        return SIZES
    if metavar == "DURATION":
        return RETENTION_SPANS
    if metavar.endswith("MS"):
        return LATENCIES
    if metavar.endswith("B/S"):
        return BANDWIDTHS
    if metavar == "GLOB":
        return GLOBS
    if name == "source":
        return path_values(world, "source")
    if name == "out":
        return path_values(world, "out")
    if name in ("mountpoint", "directory", "freeze"):
        return path_values(world, "new-mountpoint" if command in ("mount", "browse")
                           else "mounted")
    if name in ("target", "cache_dir"):
        return path_values(world, "target")
    if isinstance(kind, click.Path):
        return path_values(world, "list-file")
    return ODD_TEXT


# -- drawing a vector --------------------------------------------------------------------------


def commands(group: click.Group = cli, path: tuple[str, ...] = ()
             ) -> Iterator[tuple[str, click.Command]]:
    """Every command of the CLI, by its path (``snapshot create``), as click resolves it."""
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None
        if isinstance(command, click.Group):
            yield from commands(command, (*path, name))
        else:
            yield " ".join((*path, name)), command


@dataclasses.dataclass
class Vector:
    command: str
    argv: list[Token]
    bad: list[str]  # why it cannot succeed (empty: it may)
    scratches: list[Path] = dataclasses.field(default_factory=list)  # its paths live there
    on_repository: bool = True  # whether -r names the module's repository
    repo_from_env: str | None = None  # REPO given as SNAPFS_REPO rather than -r

    def shown(self) -> str:
        return (f"SNAPFS_REPO={self.repo_from_env!r} " if self.repo_from_env is not None
                else "") + " ".join(repr(t) if not isinstance(t, str) or not t.isprintable() or " " in t
                        or not t else t for t in self.argv)


def draw(rng: random.Random, world: World, command: str, cmd: click.Command) -> Vector:
    """Arguments in order, options in any order among them, each given with a probability
    (a required one almost always); then, sometimes, one mistake on the command line."""
    why: list[str] = []
    arguments: list[list[Token]] = []
    options: list[list[Token]] = []
    for param in cmd.params:
        if isinstance(param, click.Option) and (param.hidden or param.name == "help"):
            continue
        if isinstance(param, click.Argument):
            count = rng.choice([1, 1, 2]) if param.nargs == -1 else param.nargs
            if param.nargs == -1 and not param.required and rng.random() < 0.3:
                count = 0
            if param.required and rng.random() < 0.04:
                why.append(f"{param.name} left out")
                continue
            tokens: list[Token] = []
            for _ in range(count):
                value = rng.choice(values_for(world, command, param))
                tokens.append(value.token)
                if value.bad:
                    why.append(f"{param.name}={value.token!r}")
            arguments.append(tokens)
            continue
        assert isinstance(param, click.Option)
        if param.required and rng.random() < 0.04:
            why.append(f"{param.opts[0]} left out")
            continue
        if not param.required and rng.random() > 0.35:
            continue
        opt = rng.choice(param.opts)
        if param.is_flag:
            if rng.random() < 0.03:
                options.append([f"{opt}=yes"])
                why.append(f"{opt} given a value")
            else:
                options.append([opt])
            continue
        times = rng.choice([1, 1, 1, 2]) if param.multiple else rng.choice([1] * 8 + [2])
        given: list[Token] = []  # (kept together: of an option given twice, the last counts)
        for _ in range(times):
            value = rng.choice(values_for(world, command, param))
            given += [opt, value.token] if rng.random() < 0.9 or isinstance(value.token, bytes) \
                else [f"{opt}={value.token}"]
            if param.multiple and value.bad:
                why.append(f"{opt} {value.token!r}")
        if not param.multiple and value.bad:
            why.append(f"{opt} {value.token!r}")
        options.append(given)
    rng.shuffle(options)
    tokens_in_order: list[Token] = []
    for tokens in arguments:
        while options and rng.random() < 0.3:
            tokens_in_order += options.pop()
        tokens_in_order += tokens
    for tokens in options:
        tokens_in_order += tokens
    mistake = rng.random()
    if mistake < 0.04:
        tokens_in_order.insert(rng.randrange(len(tokens_in_order) + 1), "--no-such-option")
        why.append("unknown option")
    elif mistake < 0.07 and not any(isinstance(p, click.Argument) and p.nargs == -1
                                    for p in cmd.params):
        tokens_in_order.append("surplus")
        why.append("a surplus argument")
    elif mistake < 0.09:
        valued = [p for p in cmd.params if isinstance(p, click.Option) and not p.is_flag]
        if valued:
            tokens_in_order.append(rng.choice(valued).opts[-1])
            why.append("an option without its value")
    return Vector(command, [*command.split(), *tokens_in_order], why)


def repository_option(rng: random.Random, world: World) -> tuple[list[Token], str | None]:
    """``-r REPO``, mostly the module's repository; else somewhere that is none (which, for
    init, may become one) and what it is."""
    here = world.scratch()
    (here / "file").write_text("not a repository\n")
    (here / "empty").mkdir()
    (here / "other").mkdir()
    (here / "other" / "config").write_text("{}")
    os.mkfifo(here / "fifo")
    (here / "loop").symlink_to("loop")
    where = rng.choice([str(world.repo)] * 12 + [
        str(here / "missing"), str(here / "file"), str(here / "empty"), str(here / "other"),
        str(world.repo / "packs"), str(here / "file" / "x"), "", str(world.read_only / "empty"),
        "s3://", "s3:///prefix", "s3://Bad_Bucket!/x", "file:///tmp", str(world.repo) + "/",
        str(here / "fifo"), str(here / "loop"),
        # (inside the repository: init must not make one there, see repository_state)
        str(world.repo / "packs" / here.name), str(world.repo / here.name)])
    label = None if where in (str(world.repo), str(world.repo) + "/") else where
    endpoint: list[Token] = ["--endpoint-url", "http://127.0.0.1:1"] \
        if where.startswith("s3:") else []
    if rng.random() < 0.15:
        return ["--repo" if rng.random() < 0.5 else "-r", where, *endpoint], label
    return ["-r", where, *endpoint], label


# -- running one, and what must hold ---------------------------------------------------------


def run(world: World, argv: list[Token], env: dict[str, str] | None = None,
        cwd: Path | None = None) -> tuple[int, str, str]:
    try:
        result = subprocess.run([SNAPFS, *argv], capture_output=True, timeout=TIMEOUT,
                                env=env or world.snapfs.env, stdin=subprocess.DEVNULL,
                                cwd=cwd or world.tmp)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"snapfs {argv!r} did not end within {TIMEOUT} s") from None
    return (result.returncode, result.stdout.decode(errors="replace"),
            result.stderr.decode(errors="replace"))


def check_outcome(vector: Vector, code: int, stdout: str, stderr: str) -> None:
    said = f"snapfs {vector.shown()}\nexit {code}\nstdout: {stdout!r}\nstderr: {stderr!r}"
    assert "Traceback" not in stderr and "Traceback" not in stdout, said
    assert code in DOCUMENTED_EXITS, said
    if code != 0:
        lines = stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("snapfs: "), said
        assert len(lines[0]) > len("snapfs: ") + 3, said
    else:
        assert all(line.startswith("snapfs: ") for line in stderr.splitlines()), said
    if code == 2:
        assert stdout == "", said
    if vector.bad:
        assert code != 0, f"{said}\nit should have failed: {', '.join(vector.bad)}"


def undo_success(world: World) -> None:
    """What a vector that succeeded leaves running: a browse is unbrowsed and a mount unmounted,
    through snapfs (so that its own way is tested too)."""
    while True:  # browses first: unbrowse stops the daemon that browse started
        ours = sorted((m for m in mounts_under(world.tmp) if m[0] not in world.kept_mounts()),
                      key=lambda m: m[1] == "fuse.snapfs")
        if not ours:
            return
        where, fstype = ours[0]
        verb = "umount" if fstype == "fuse.snapfs" else "unbrowse"
        code, out, err = run(world, [verb, where])
        assert code == 0, (verb, where, out, err)


def check_left_behind(world: World, daemons: set[int]) -> None:
    """No mount, loop device or daemon of the vectors' (but ``daemons``) is left."""
    left = [m for m in mounts_under(world.tmp) if m[0] not in world.kept_mounts()]
    assert left == [], f"left mounted: {left}"
    assert loops_under(world.tmp) == {}
    pids = {int(p.read_text() or 0) for p in world.runtime.glob("*.pid")} - daemons - {0}
    wait_for(lambda: not any(pid_running(pid) for pid in pids), 30,
             f"the daemons {pids} to exit")


def run_vector(world: World, vector: Vector, before: dict[str, bytes],
               daemons: frozenset[int] = frozenset()) -> dict[str, bytes]:
    """Run ``vector``, check all that must hold, and return the repository's state after it
    (the pristine one, restored, if it wrote). ``daemons``: those running before it."""
    env = None if vector.repo_from_env is None else \
        {**world.snapfs.env, "SNAPFS_REPO": vector.repo_from_env}
    files = tree_state(vector.scratches)
    source = world.source.read_bytes()
    code, stdout, stderr = run(world, vector.argv, env)
    check_outcome(vector, code, stdout, stderr)
    assert world.source.read_bytes() == source, vector.shown()
    if code != 0:  # (one that succeeded may have written: an export over a file, an init)
        assert tree_state(vector.scratches) == files, f"{vector.shown()} changed files"
    if code == 0:
        undo_success(world)
    check_left_behind(world, set(daemons))
    assert locks_left(world.repo) == [], (vector.shown(), locks_left(world.repo))
    after = repository_state(world.repo)
    if after != before:
        changed = sorted(set(after) ^ set(before) | {k for k in after.keys() & before.keys()
                                                       if after[k] != before[k]})
        profiles_only = all(key.startswith("profiles/") for key in changed)
        assert vector.on_repository and (
            code == 0 and vector.command in WRITERS
            or profiles_only and vector.command in STORE_PROFILES), \
            f"snapfs {vector.shown()} (exit {code}, {stderr!r}) changed {changed}"
        restore_repository(world)
        after = repository_state(world.repo)
    return after


def vectors(seed: int, world: World, count: int, only: set[str] | None = None,
            bad_only: bool = False) -> list[Vector]:
    """``count`` vectors of the commands (``only`` those), drawn by ``seed``; ``bad_only``:
    each holds a mistake (drawn again until it does)."""
    rng = random.Random(seed)
    table = [(path, cmd) for path, cmd in commands() if only is None or path in only]
    drawn = []
    for _ in range(count):
        path, cmd = rng.choice(table)
        vector = draw(rng, world, path, cmd)
        while bad_only and not vector.bad:
            vector = draw(rng, world, path, cmd)
        repo_args, elsewhere = repository_option(rng, world) if rng.random() < 0.97 \
            else ([], "no -r")
        if repo_args[:1] == ["-r"] and rng.random() < 0.1:  # the same, from the environment
            vector.repo_from_env = str(repo_args[1])
            repo_args = repo_args[2:]
        vector.argv = [*repo_args, *vector.argv]
        vector.on_repository = elsewhere is None
        vector.scratches, world.scratches = world.scratches, []
        drawn.append(vector)
    return drawn


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.root
@needs_root
def test_fuzz_the_command_line(seed: int, world: World) -> None:
    restore_repository(world)
    before = repository_state(world.repo)
    failed = []
    for vector in vectors(seed, world, VECTORS):
        try:
            before = run_vector(world, vector, before)
        except AssertionError as e:  # every vector of the seed runs: all that fail are shown
            failed.append(str(e).partition("\nassert")[0])
            restore_repository(world)
            before = repository_state(world.repo)
    assert not failed, f"{len(failed)} of {VECTORS} vectors failed:\n\n" + "\n\n".join(failed)


#: what the vectors of a running mount run: the commands that need one, and those that ask it
WITH_A_MOUNT = NEED_A_MOUNT | {"snapshot create", "umount", "snapshot delete"}
MOUNT_VECTORS = int(os.environ.get("SNAPFS_FUZZ_MOUNT_VECTORS", "30"))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.root
@needs_root
def test_fuzz_the_commands_of_a_running_mount(seed: int, world: World) -> None:
    """Bad vectors only (each would change the mount or its disks if it worked): the mount
    keeps serving, no disk is made, and the repository is unchanged."""
    restore_repository(world)
    before = repository_state(world.repo)
    served = world.tmp / "served"
    with mounted(world.snapfs, served, world.tmp / "served-cache", "--no-background") as daemon:
        world.served = served
        try:
            failed = []
            for vector in vectors(seed, world, MOUNT_VECTORS, WITH_A_MOUNT, bad_only=True):
                try:
                    before = run_vector(world, vector, before, frozenset({daemon.pid}))
                except AssertionError as e:
                    failed.append(str(e).partition("\nassert")[0])
                    restore_repository(world)
                    before = repository_state(world.repo)
                assert pid_running(daemon.pid) and os.path.ismount(served), vector.shown()
            assert daemon.ask("disk-list")["disks"] == []
            assert sorted(p.name for p in daemon.images.iterdir()) == \
                ["alpha.img", "beta.img", "fs.img", "gamma.img"]
        finally:
            world.served = None
    assert not failed, f"{len(failed)} of {MOUNT_VECTORS} vectors failed:\n\n" + \
        "\n\n".join(failed)


@pytest.mark.s3
@pytest.mark.root
@needs_root
def test_a_bucket_that_does_not_exist(world: World, request: pytest.FixtureRequest) -> None:
    """A few vectors on ``s3://`` of a bucket the test SeaweedFS does not have: each fails in
    one line, and none makes the bucket."""
    seaweed = request.getfixturevalue("seaweed")
    env = {**store_env(request, s3=True), "SNAPFS_RUNTIME_DIR": str(world.runtime),
           "SNAPFS_CACHE_DIR": str(world.cache)}
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    location = ["-r", f"s3://{bucket}/repo", "--endpoint-url", seaweed.endpoint_url]
    out = world.scratch() / "out.img"
    for args in [("snapshot", "list"), ("snapshot", "show", "alpha"), ("verify",), ("prune",),
                 ("snapshot", "create", str(world.source)), ("export", "alpha", str(out)),
                 ("policy", "set", "--keep-last", "1"), ("unlock",)]:
        vector = Vector(args[0], [*location, *args], ["no such bucket"])
        check_outcome(vector, *run(world, vector.argv, env=env))
        assert not out.exists()
    import boto3

    client = boto3.session.Session().client("s3", endpoint_url=seaweed.endpoint_url)
    try:
        assert bucket not in {b["Name"] for b in client.list_buckets()["Buckets"]}
    finally:
        client.close()


# -- what the fuzz found -----------------------------------------------------------------------


@pytest.fixture
def small_repo(tmp_path: Path, request: pytest.FixtureRequest) -> Snapfs:
    """A local repository with one snapshot (``alpha``, disk ``a``) of a small random image."""
    snapfs = Snapfs(str(tmp_path / "repo"), None,
                    {**store_env(request, s3=False), "SNAPFS_CACHE_DIR": str(tmp_path / "cache"),
                     "SNAPFS_RUNTIME_DIR": str(tmp_path / "run")})
    snapfs.ok("init", "--block-size", "4K")
    snapfs.ok("snapshot", "create", random_image(tmp_path / "a.img", MiB // 4, seed=3),
              "--name", "alpha", "--disk", "a")
    return snapfs


def run_raw(snapfs: Snapfs, *args: Token, cwd: Path) -> tuple[int, str, str]:
    """``snapfs -r REPO ARGS`` with arguments that may be bytes (not UTF-8), run in ``cwd``."""
    result = subprocess.run([SNAPFS, "-r", str(snapfs.repo), *args], capture_output=True,
                            timeout=TIMEOUT, env=snapfs.env, cwd=cwd, stdin=subprocess.DEVNULL)
    return (result.returncode, result.stdout.decode(errors="replace"),
            result.stderr.decode(errors="replace"))


def one_line(code: int, stderr: str, want_code: int) -> str:
    assert code == want_code, (code, stderr)
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("snapfs: "), stderr
    return lines[0]


def test_a_label_or_tag_that_is_not_utf8_is_refused(small_repo: Snapfs, tmp_path: Path) -> None:
    """Bytes of the command line that are not UTF-8 were stored in a snapshot's root and in a
    policy as lone surrogates (``"\\udcff"`` in the JSON), text no other reader takes and no
    one can type again; a file name's such bytes become U+FFFD in a default label."""
    repo = Path(str(small_repo.repo))
    image = tmp_path / "a.img"
    before = repository_state(repo)
    for args, said in [
            (("snapshot", "create", image, "--tag", b"t\xff"), "--tag 't\\udcff' is not UTF-8"),
            (("snapshot", "create", image, "--disk", b"d\xfe"), "--disk 'd\\udcfe' is not UTF-8"),
            (("snapshot", "list", "--disk", b"d\xfe"), "--disk 'd\\udcfe' is not UTF-8"),
            (("snapshot", "forget", "--keep-last", "1", "--keep-tag", b"\xff"),
             "--keep-tag '\\udcff' is not UTF-8"),
            (("policy", "set", "--keep-last", "1", "--keep-tag", b"\xff"),
             "--keep-tag '\\udcff' is not UTF-8")]:
        line = one_line(*run_raw(small_repo, *args, cwd=tmp_path)[::2], 2)
        assert said in line, (args, line)
    assert repository_state(repo) == before
    odd = tmp_path / os.fsdecode(b"disk\xff.img")
    shutil.copyfile(image, odd)
    code, out, err = run_raw(small_repo, "snapshot", "create", odd, "--json", cwd=tmp_path)
    assert code == 0, err
    assert json.loads(out)["disk"] == "disk\ufffd.img"
    assert "\\udc" not in (repo / "snapshots" / json.loads(out)["id"]).read_text()


@pytest.mark.root
@needs_root
def test_an_empty_path_is_refused_not_taken_for_the_working_directory(
        small_repo: Snapfs, tmp_path: Path) -> None:
    """``""`` (an unset variable in ``"$DIR"``) was the working directory: ``mount ""`` in an
    empty directory mounted there, ``umount ""`` unmounted it; ``--cache-dir ""`` was the
    default cache and ``--prefetch-list ""`` none, silently."""
    work = tmp_path / "work"
    work.mkdir()
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    try:
        for args, what in [(("mount", ""), "MOUNTPOINT"),
                           (("mount", mountpoint, "--cache-dir", ""), "--cache-dir"),
                           (("mount", mountpoint, "--prefetch-list", ""), "--prefetch-list"),
                           (("umount", ""), "MOUNTPOINT"), (("stats", ""), "MOUNTPOINT"),
                           (("browse", "alpha", ""), "DIRECTORY"), (("unbrowse", ""), "DIRECTORY"),
                           (("restore-files", "alpha", "--to", ""), "--to"),
                           (("snapshot", "create", ""), "[SOURCE]"),
                           (("snapshot", "create", "--disk", "d", "--freeze", ""), "--freeze")]:
            code, _, err = run_raw(small_repo, *map(str, args), cwd=work)
            line = one_line(code, err, 2)
            assert line.startswith(f"snapfs: invalid value for '{what}': must not be empty"), line
            assert mounts_under(tmp_path) == [], args
    finally:
        for where, _ in mounts_under(tmp_path):
            subprocess.run(["fusermount3", "-u", "-z", where], check=False)
    assert not (tmp_path / "cache").exists()


def test_a_repository_location_of_another_scheme_is_refused(small_repo: Snapfs,
                                                            tmp_path: Path) -> None:
    """``file:///srv/repo`` (borg's way to write a local path) was a directory ``file:`` under
    the working directory, which init made and snapshots went into."""
    for location in ("file:///srv/repo", "sftp://host/repo", "S3://bucket/prefix"):
        for args in (("init",), ("snapshot", "list")):
            result = small_repo.with_repo(location)(*args, cwd=tmp_path)
            line = one_line(result.returncode, result.stderr, 2)
            assert line == f"snapfs: not a repository location: {location!r} (a directory " \
                           "path, or s3://BUCKET[/PREFIX])", line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.img", "repo"]


def test_a_disks_label_with_a_newline_stays_on_the_errors_one_line(small_repo: Snapfs,
                                                                   tmp_path: Path) -> None:
    small_repo.ok("snapshot", "create", tmp_path / "a.img", "--disk", "two\nlines")
    result = small_repo("policy", "delete", "--disk", "two\nlines")
    assert one_line(result.returncode, result.stderr, 3) == \
        "snapfs: no retention policy stored for disk two\\nlines"
    result = small_repo("snapshot", "forget", "--keep-tag", "none", "--disk", "two\nlines")
    assert one_line(result.returncode, result.stderr, 2).startswith(
        "snapfs: the retention policy keeps no snapshot of disk two\\nlines: refusing")


@pytest.mark.root
@needs_root
def test_a_simulated_latency_longer_than_any_links_is_refused(small_repo: Snapfs,
                                                               tmp_path: Path) -> None:
    """An hour held ``mount`` up for good (it returns once its daemon has read the index), and
    more than ``time.sleep`` takes failed the daemon ("(OverflowError)", exit 1)."""
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    runtime = Path(small_repo.env["SNAPFS_RUNTIME_DIR"])
    try:
        for latency, got in [("99999999999s", "1e+11 s"), ("3600s", "3600 s"),
                             ("10001ms", "10.001 s")]:
            result = small_repo("mount", mountpoint, "--simulate-latency", latency, timeout=30)
            assert one_line(result.returncode, result.stderr, 2) == \
                f"snapfs: --simulate-latency must be at most 10 s (got {got})"
        assert not os.path.ismount(mountpoint)
    finally:  # (what the old code left: a daemon that sleeps, or that mounted after all)
        if os.path.ismount(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
        for pid_file in runtime.glob("*.pid"):
            pid = int(pid_file.read_text() or 0)
            if pid and pid_running(pid):
                os.kill(pid, signal.SIGKILL)
                wait_for(lambda pid=pid: not pid_running(pid), 10, f"daemon {pid} to die")


@pytest.mark.root
@needs_root
def test_a_prefetch_list_that_is_no_regular_file_is_refused(small_repo: Snapfs,
                                                            tmp_path: Path) -> None:
    """The daemon opened ``--prefetch-list`` after the fork: a FIFO held ``mount`` up until
    something wrote to it."""
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    fifo = tmp_path / "list"
    os.mkfifo(fifo)
    runtime = Path(small_repo.env["SNAPFS_RUNTIME_DIR"])
    try:
        for path in (fifo, Path("/dev/zero")):
            result = small_repo("mount", mountpoint, "--prefetch-list", path, timeout=20)
            assert one_line(result.returncode, result.stderr, 2) == \
                f"snapfs: prefetch list {path} is not a regular file"
        assert not os.path.ismount(mountpoint)
    finally:  # (what the old code left: a daemon waiting for the FIFO, which then mounts)
        release_fifo_reader(fifo)
        wait_for(lambda: not any(pid_running(int(p.read_text() or 0))
                                 for p in runtime.glob("*.pid")) or os.path.ismount(mountpoint),
                 10, "the daemon to mount or end")
        if os.path.ismount(mountpoint):
            small_repo.ok("umount", mountpoint)


def test_init_inside_a_repository_is_refused(store_url: str, store_endpoint: str | None,
                                             request: pytest.FixtureRequest,
                                             make_store: Any) -> None:
    """``init`` inside another repository (``REPO/packs/new``, ``REPO/sub``) made one whose
    objects the outer one's prune deleted as packs no index names (its config, then every
    pack of its snapshots), and that ``repair index`` read as packs."""
    snapfs = Snapfs(store_url, store_endpoint, store_env(request, store_url.startswith("s3://")))
    snapfs.ok("init")
    store = make_store(store_url)
    before = sorted(key for key, _ in store.list(""))
    for inner in ("packs/new", "sub", "snapshots/x/y"):
        result = snapfs.with_repo(f"{store_url}/{inner}")("init")
        line = one_line(result.returncode, result.stderr, 2)
        assert f"/{inner}" in line and line.endswith(
            f" is inside the repository {store.url}: refusing to init there (its prune would "
            "delete the new repository's objects)"), line
    assert sorted(key for key, _ in store.list("")) == before
    assert "0 packs deleted" in snapfs.ok("prune")
