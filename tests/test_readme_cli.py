"""README.md's "Command line" section, held to what the real ``snapfs`` does.

The synopsis (its block of ``snapfs ...`` lines) against every command's real help, run as a
subprocess: each command has a line and each line names a command; each option a line gives
exists, takes a value exactly when the real one does, and is repeatable there only if the real
one is; each option a command takes is on one of its lines (a required one bare, never in
brackets); a line's arguments are the command's, in order; a value that is no placeholder
(``[--cache-size 20G]``) is the default; ``-r REPO`` is on the lines of the commands that need
a repository, and only there. The global options README lists are the real ones.

Then the JSON: every key README names for a command's ``--json`` (its lists of keys, and each
"`KEY` in `--json`" in passing) is in what that command prints, run for real on a small local
repository, and where a command needs one, a mount of it. A list without "…" is the whole of
it: no other key is there. The keys are read from README.md, never written out here, so the
tests follow README and fail when the two part.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from diskimages import MiB, random_image, write_at
from mountutil import MOUNTS, Served, mounted, wait_for
from testkit import EXIT_USAGE, SNAPFS, Snapfs, reap, store_env, uploads_held

README = Path(__file__).resolve().parent.parent / "README.md"

#: an identifier as README writes a JSON key: `snake_case`
KEY = re.compile(r"[a-z][a-z0-9_]*")


def command_line_section() -> str:
    """README's "Command line" section, its subsections included."""
    return README.read_text().split("\n## Command line\n", 1)[1].split("\n## ", 1)[0]


# -- usages: as the synopsis writes them, as --help says them ------------------------------


@dataclasses.dataclass
class Option:
    names: frozenset[str]
    takes_value: bool
    repeated: bool = False  # (synopsis: ``[--tag T]...``)
    required: bool = False  # (synopsis: bare, outside brackets; help: ``[required]``)
    value: str | None = None  # (synopsis: what it writes for the value, ``16K`` or ``SIZE``)
    default: str | None = None  # (help: ``[default: 16K]`` or ``(default: 10)``)


@dataclasses.dataclass(frozen=True)
class Argument:
    name: str
    optional: bool
    repeated: bool


@dataclasses.dataclass
class Usage:
    command: tuple[str, ...]  # ("snapshot", "create"); () for snapfs itself
    options: list[Option]
    arguments: list[Argument]
    text: str = ""  # the synopsis line (or help) it was read from
    global_options: list[Option] = dataclasses.field(default_factory=list)
    subcommands: list[str] = dataclasses.field(default_factory=list)  # (a group's help)

    def option(self, name: str) -> Option | None:
        return next((o for o in self.options if name in o.names), None)


_SYNOPSIS_TOKEN = re.compile(r"\[([^\]]*)\](\.\.\.|…)?|(\S+)")


def synopsis() -> list[Usage]:
    """The synopsis block's lines, each read as a usage.

    A line is ``snapfs [GLOBAL OPTIONS] COMMAND... ARGUMENTS... OPTIONS...``: command words are
    lower case, arguments upper case (``[SNAP...]`` optional, ``...`` repeated); an option in
    brackets takes a value if a word follows it there (``[--cache-size 20G]``), a bare one if
    the next bare word is not an option (``--from SNAP``); ``]...`` makes it repeatable.
    An indented line goes on the one before; ``# ...`` is a comment. ``[--keep-… as for
    forget]...`` stands for the ``--keep-`` options of the ``forget`` line."""
    block = re.search(r"```\n(.*?)```", command_line_section(), re.S)
    assert block is not None, "no synopsis block in README's Command line section"
    lines = re.sub(r"\n[ \t]+", " ", block.group(1)).splitlines()
    usages = [_synopsis_line(re.sub(r"\s+#.*", "", line)) for line in lines if line.strip()]
    for usage in usages:  # the "as for forget" stand-ins, now that every line is read
        for option in list(usage.options):
            (name,) = option.names
            if "…" in name:
                prefix, _, of = name.partition("…")
                source = [u for u in usages if u.command[-1:] == (of.split()[-1],)]
                assert source, f"{usage.text}: no line of {of!r}"
                usage.options.remove(option)
                # (its "]..." says several of them, not that each is repeatable)
                usage.options += [dataclasses.replace(o) for u in source for o in u.options
                                  if any(n.startswith(prefix) for n in o.names)]
    return usages


def _synopsis_line(line: str) -> Usage:
    assert line.startswith("snapfs "), line
    usage = Usage((), [], [], line)
    command: list[str] = []
    waiting: Option | None = None  # a bare option whose value may follow
    for m in _SYNOPSIS_TOKEN.finditer(line.removeprefix("snapfs ")):
        grouped, repeated, word = m.group(1), bool(m.group(2)), m.group(3)
        if word is not None:
            if word.startswith("-"):
                waiting = Option(frozenset({word}), False, required=True)
                (usage.options if command else usage.global_options).append(waiting)
            elif waiting is not None:
                waiting.takes_value, waiting.value, waiting = True, word, None
            elif KEY.fullmatch(word.replace("-", "_")):
                command.append(word)
            else:
                usage.arguments.append(Argument(word.removesuffix("..."), False,
                                                word.endswith("...")))
            continue
        waiting = None
        inside = grouped.split()
        if inside[0].startswith("-"):
            name = inside[0] if "…" not in inside[0] else " ".join(inside)
            usage.options.append(Option(frozenset({name}), len(inside) > 1, repeated,
                                        value=inside[1] if len(inside) == 2 else None))
        else:
            (name,) = inside
            usage.arguments.append(Argument(name.removesuffix("..."), True,
                                            repeated or name.endswith("...")))
    usage.command = tuple(command)
    return usage


_HELP_OPTION = re.compile(r"  (-{1,2}[\w-]+(?:, -{1,2}[\w-]+)*)( \S+)?(?:\s{2,}|$)")


def help_usage(command: tuple[str, ...], text: str) -> Usage:
    """What ``snapfs COMMAND --help`` (click's help) says of the command's usage."""
    first = text.splitlines()[0]
    assert first.startswith("Usage: snapfs "), first
    words = first.split()[2 + len(command):]
    usage = Usage(command, [], [], text)
    if "Commands:" in text:
        usage.subcommands = re.findall(r"^  ([a-z][a-z-]*)  ", text.split("\nCommands:\n")[1],
                                       re.M)
    else:
        for word in words:
            if word == "[OPTIONS]":
                continue
            repeated = word.endswith("...")
            name = word.removesuffix("...")
            optional = name.startswith("[")
            usage.arguments.append(Argument(name.strip("[]"), optional, repeated))
    entries: list[list[str]] = []
    section = text.split("\nOptions:\n")[1].split("\n\n")[0]
    for line in section.splitlines():
        if line.startswith("  -"):
            entries.append([line])
        else:
            entries[-1].append(line)
    for entry in entries:
        m = _HELP_OPTION.match(entry[0])
        assert m is not None, entry
        said = " ".join(" ".join(entry).split())
        default = re.search(r"[\[(]default: ([^\])]+)[\])]", said)
        usage.options.append(Option(frozenset(m.group(1).split(", ")), m.group(2) is not None,
                                    required="[required]" in said,
                                    default=default.group(1) if default else None))
    return usage


@pytest.fixture(scope="module")
def cli_env(request: pytest.FixtureRequest) -> dict[str, str]:
    return store_env(request, False)


@pytest.fixture(scope="module")
def real_usages(cli_env: dict[str, str]) -> dict[tuple[str, ...], Usage]:
    """Every command and subcommand, as its real ``--help`` says it (``-h`` below the top,
    which README says works at every level), the commands found as the helps list them."""
    snapfs = Snapfs(None, None, cli_env)
    top = help_usage((), snapfs.ok("--help"))
    usages: dict[tuple[str, ...], Usage] = {(): top}
    level: list[tuple[str, ...]] = [(name,) for name in top.subcommands]
    while level:
        found = []
        for args, result in snapfs.each(*[(*command, "-h") for command in level]):
            assert result.returncode == 0 and result.stderr == "", (args, result)
            usage = help_usage(tuple(args[:-1]), result.stdout)
            usages[usage.command] = usage
            found += [(*usage.command, name) for name in usage.subcommands]
        level = found
    return usages


def click_command(path: tuple[str, ...]) -> tuple[click.Command, click.Context]:
    """The click object of ``snapfs PATH``, in a context as ``snapfs PATH`` gives it."""
    from snapfs.cli import cli

    command: click.Command = cli
    ctx = click.Context(cli, info_name="snapfs", **cli.context_settings)
    for name in path:
        assert isinstance(command, click.Group)
        found = command.get_command(ctx, name)
        assert found is not None, path
        command = found
        ctx = click.Context(command, parent=ctx, info_name=name, **command.context_settings)
    return command, ctx


def click_params(path: tuple[str, ...]) -> list[click.Parameter]:
    command, ctx = click_command(path)
    return command.get_params(ctx)


def leaves(usages: dict[tuple[str, ...], Usage]) -> dict[tuple[str, ...], Usage]:
    """The commands that run (not groups)."""
    return {c: u for c, u in usages.items() if c and not u.subcommands}


def test_the_help_is_read_as_click_has_it(real_usages: dict[tuple[str, ...], Usage]) -> None:
    """The measure first: what the helps are read to say is what click's objects hold."""
    assert len(leaves(real_usages)) > 20
    for command, usage in real_usages.items():
        params = click_params(command)
        options = [p for p in params if isinstance(p, click.Option)]
        assert sorted(sorted(o.names) for o in usage.options) == \
            sorted(sorted(p.opts + p.secondary_opts) for p in options), command
        for p in options:
            got = usage.option(p.opts[0])
            assert got is not None
            assert got.takes_value == (not p.is_flag and not p.count), (command, p.opts)
            assert got.required == p.required, (command, p.opts)
        arguments = [p for p in params if isinstance(p, click.Argument)]
        assert [(a.optional, a.repeated) for a in usage.arguments] == \
            [(not p.required, p.nargs == -1) for p in arguments], command


def test_every_command_has_a_synopsis_line_and_every_line_a_command(
        real_usages: dict[tuple[str, ...], Usage]) -> None:
    described = {u.command for u in synopsis()}
    assert sorted(described - set(leaves(real_usages))) == []
    assert sorted(set(leaves(real_usages)) - described) == []


def test_every_option_on_a_synopsis_line_is_the_commands_own(
        real_usages: dict[tuple[str, ...], Usage]) -> None:
    for line in synopsis():
        real = real_usages[line.command]
        for option in line.options:
            (name,) = option.names
            got = real.option(name)
            assert got is not None, f"{name} is no option of snapfs {' '.join(line.command)}"
            assert got.takes_value == option.takes_value, \
                (f"{name} takes {'a' if got.takes_value else 'no'} value: {line.text}")
            if option.repeated:
                param = next(p for p in click_params(line.command)
                             if isinstance(p, click.Option) and name in p.opts)
                assert param.multiple, f"{name} is not repeatable: {line.text}"
        for option in line.global_options:
            (name,) = option.names
            got = real_usages[()].option(name)
            assert got is not None and got.takes_value == option.takes_value, line.text


def test_every_option_of_a_command_is_on_its_synopsis_lines(
        real_usages: dict[tuple[str, ...], Usage]) -> None:
    lines = synopsis()
    for command, real in leaves(real_usages).items():
        own = [line for line in lines if line.command == command]
        for option in real.options:
            if option.names & {"-h", "--help"}:
                continue
            given = [o for line in own for o in line.options if o.names & option.names]
            assert given, f"{sorted(option.names)} of snapfs {' '.join(command)} is not in " \
                          "README's synopsis"
            if option.required:
                for line in own:
                    assert [o for o in line.options if o.names & option.names and o.required], \
                        f"{sorted(option.names)} is required: {line.text}"
        for param in click_params(command):
            if isinstance(param, click.Option) and param.multiple:
                assert [o for line in own for o in line.options
                        if o.names & set(param.opts) and o.repeated], \
                    f"{param.opts} is repeatable: say so (]...) on a line of {command}"


def test_a_synopsis_lines_arguments_are_the_commands(
        real_usages: dict[tuple[str, ...], Usage]) -> None:
    """In order, and repeated only where the command repeats them. One the command needs is on
    every line, never in brackets; one it may go without is in brackets, or left out of
    another line of the command (``snapshot create --disk NAME`` beside ``snapshot create
    SOURCE``), at the end."""
    lines = synopsis()
    for line in lines:
        arguments = real_usages[line.command].arguments
        assert len(line.arguments) <= len(arguments), line.text
        for written, argument in zip(line.arguments, arguments, strict=False):
            assert written.optional <= argument.optional, (written, line.text)
            assert written.repeated == argument.repeated, (written, line.text)
        for argument in arguments[len(line.arguments):]:
            assert argument.optional, f"{argument.name} is missing: {line.text}"
    for command, real in leaves(real_usages).items():
        own = [line for line in lines if line.command == command]
        for i, argument in enumerate(real.arguments):
            if argument.optional:
                assert [line for line in own if len(line.arguments) <= i
                        or line.arguments[i].optional], \
                    f"{argument.name} may be left out: no line of {command} says so"


def test_a_synopsis_value_that_is_no_placeholder_is_the_default(
        real_usages: dict[tuple[str, ...], Usage]) -> None:
    """``[--cache-size 20G]``: what the option is without it, as its help says (``SIZE``,
    ``MB/s``: placeholders; ``20ms`` where the help gives no default: an example)."""
    compared = 0
    for line in synopsis():
        for option in line.options:
            (name,) = option.names
            real = real_usages[line.command].option(name)
            if option.value is None or option.value[0].isupper() or "|" in option.value \
                    or real is None or real.default is None:
                continue
            default, written = real.default, option.value
            if re.fullmatch(r"[\d.]+", default) and re.fullmatch(r"[\d.]+", written):
                default, written = str(float(default)), str(float(written))
            assert written == default, f"{name} is {real.default} by default: {line.text}"
            compared += 1
    assert compared >= 9


def test_the_global_options_are_the_real_ones(
        real_usages: dict[tuple[str, ...], Usage]) -> None:
    said = re.search(r"Options before the command are global: (.*?);", command_line_section(),
                     re.S)
    assert said is not None
    named = {m.split()[0] for m in re.findall(r"`(-[^`]+)`", said.group(1))}
    real = [o for o in real_usages[()].options if not o.names & {"-h", "--help"}]
    assert sorted(sorted(o.names & named) for o in real) == sorted([n] for n in named)
    for command, usage in real_usages.items():  # "-h/--help works at every level"
        assert usage.option("-h") is usage.option("--help") is not None, command


def test_a_synopsis_line_gives_a_repository_where_the_command_needs_one(
        cli_env: dict[str, str], tmp_path: Path) -> None:
    """``-r REPO`` on the lines of the commands that need a repository, and only there: each
    line run as written without one (neither ``-r`` nor ``SNAPFS_REPO``), every argument and
    value ``readme`` (a name, and a path in an empty directory), says it needs one or not.
    Two commands check first what README says they need before they ask a repository:
    ``disk rollback`` without a terminal needs ``--yes``, ``policy set`` a rule."""
    assert "SNAPFS_REPO" not in cli_env
    first_needed: dict[tuple[str, ...], list[str]] = {
        ("disk", "rollback"): ["--yes"], ("policy", "set"): ["--keep-last", "1"]}
    runs = []
    for line in synopsis():
        args = [*line.command, *("readme" for a in line.arguments if not a.optional),
                *first_needed.get(line.command, [])]
        for option in line.options:
            if option.required:  # (written bare)
                args += [*option.names, *(["readme"] if option.takes_value else [])]
        runs.append((line, subprocess.Popen([SNAPFS, *args], cwd=tmp_path, env=cli_env,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            text=True)))
    needing = set()
    for line, proc in runs:
        try:
            _, stderr = proc.communicate(timeout=60)
        finally:
            reap(proc)
        if proc.returncode == EXIT_USAGE and "no repository given" in stderr:
            needing.add(line.text)
    assert {u.text for u in synopsis() if u.global_options} == needing


# -- the JSON keys README names ---------------------------------------------------------------


def balanced(text: str, start: int) -> str:
    """The text of the parenthesis that opens at ``text[start]``, without its own brackets."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + 1:i]
    raise AssertionError(f"no end to the parenthesis at {text[start:start + 60]!r}")


def top_level(text: str) -> str:
    """``text`` without what it says in parentheses."""
    while (m := re.search(r"\([^()]*\)", text)) is not None:
        text = text[:m.start()] + text[m.end():]
    return text


@dataclasses.dataclass(frozen=True)
class KeyList:
    """Keys README lists for a JSON object: ``whole`` unless the list ends in "…"."""

    keys: frozenset[str]
    whole: bool

    def check(self, doc: dict[str, Any], what: str, optional: frozenset[str] = frozenset()
              ) -> None:
        assert sorted(self.keys - optional - set(doc)) == [], f"{what}: README's keys missing"
        if self.whole:
            assert sorted(set(doc) - self.keys) == [], f"{what}: keys README does not name"


def key_list(text: str, backticked: bool = True) -> KeyList:
    """The keys a README list names (``text``: the list, asides in parentheses left out)."""
    words = re.findall(r"`([^`]+)`", text) if backticked else re.split(r",\s*|\s+and\s+", text)
    keys = frozenset(w.strip() for w in words if KEY.fullmatch(w.strip()))
    return KeyList(keys, "…" not in text)


def passage(start: str, end: str) -> str:
    """README's Command line section from the first ``start`` (a regex) to the ``end`` after."""
    section = command_line_section()
    m = re.search(start, section)
    assert m is not None, f"README no longer says {start!r}"
    stop = re.compile(end).search(section, m.end())
    assert stop is not None, end
    return section[m.end():stop.start()]


def created_keys() -> tuple[KeyList, frozenset[str]]:
    """``snapshot create SOURCE --json``'s keys (README: "(with `--json`: id, name, …)") and
    those of them "left out" in some case."""
    section = command_line_section()
    m = re.search(r"`snapshot create` prints the new id \(with `--json`: ", section)
    assert m is not None
    listed = balanced(section, m.end() - len("(with `--json`: ")).removeprefix("with `--json`: ")
    optional = frozenset(re.findall(r"(\w+) \([^()]*left out", listed))
    return key_list(top_level(listed), backticked=False), optional


def task_keys() -> tuple[KeyList, KeyList, KeyList]:
    """``snapshot create --disk --json``: the task's keys, each part's, and the stored
    snapshot's figures in a part."""
    text = passage(r"with `--json`, the snapshot task: ", r"\.\n")
    task, part, stored = re.split(r",\s+one\s+per\s+disk\s+with\s+its\s+|"
                                  r"once\s+stored,\s+`snapshot`:\s+", text)
    return (key_list(top_level(task)), key_list(top_level(part) + " `snapshot`"),
            key_list(stored))


def stats_keys() -> tuple[KeyList, dict[str, KeyList]]:
    """``stats --json``: the top-level keys, and of those README details, theirs."""
    text = passage(r"`--json`\s+prints the daemon's raw figures: ", r"\n\n|\n- |\Z")
    nested = {}
    for m in re.finditer(r"`(\w+)`\s+\(", text):
        inner = balanced(text, m.end() - 1)
        if re.search(r"`\w+`", inner):  # (not "`disks` (as in `disk list --json`)")
            nested[m.group(1)] = key_list(top_level(inner))
    return key_list(top_level(text)), nested


def disk_list_keys() -> KeyList:
    text = passage(r"- `disk list --json` gives each disk's ", r"\n- ")
    return KeyList(key_list(text).keys, whole=False)  # "what was written and changed, ..."


def keys_in_passing() -> set[str]:
    """The keys README names in passing for some ``--json``: in an aside that mentions it
    ("(`deleted_meanwhile` in `--json`)", "(`--json`: `stuck`)"), or "`--json` as `reason`"."""
    section = command_line_section()
    keys = set()
    for aside in re.findall(r"\(([^()]*)\)", section):
        if "--json`" in aside:
            keys |= {k for k in re.findall(r"`([^`]+)`", aside) if KEY.fullmatch(k)}
    keys |= set(re.findall(r"`--json` as `(\w+)`", section))
    return keys


#: where each key README names in passing is checked, by the test that runs its command
IN_PASSING = {
    "deleted_meanwhile": "verify", "unreadable_roots": "verify",
    "packs_corrected": "repair index", "unreadable_removed": "unlock",
    "stuck": "snapshot create --disk", "consistency": "snapshot create --disk",
    "read_by": "snapshot list", "reason": "snapshot list",
    "group_size": "snapshot list of a group", "group_stored": "snapshot list of a group",
    "blocks_staged_now": "disk list",
    "unmatched_includes": "restore-files", "error": "restore-files",
}


def test_every_key_readme_names_in_passing_is_checked() -> None:
    assert keys_in_passing() == set(IN_PASSING)


def test_the_key_lists_are_read_from_readme() -> None:
    """The measure: README's lists, read as a reader reads them."""
    created, optional = created_keys()
    assert {"id", "seconds", "blocks_changed"} <= created.keys and created.whole
    assert optional == {"blocks_changed"}
    task, part, stored = task_keys()
    assert {"id", "parts"} <= task.keys and {"snapshot_id", "snapshot"} <= part.keys
    assert "blocks_read" in stored.keys and not stored.whole
    top, nested = stats_keys()
    assert {"mountpoint", "cache", "hydrator"} <= top.keys and top.whole
    assert "snapshot" in nested["images"].keys and not nested["hydrator"].whole
    assert {"name", "base_deleted"} <= disk_list_keys().keys


@pytest.fixture(scope="module")
def repo_snapfs(tmp_path_factory: pytest.TempPathFactory, cli_env: dict[str, str],
                runtime_dir: Path) -> Snapfs:
    """``snapfs`` on a new local repository (its runs' files in ``runtime_dir``)."""
    base = tmp_path_factory.mktemp("readme")
    snapfs = Snapfs(str(base / "repo"), None, {
        **cli_env, "SNAPFS_RUNTIME_DIR": str(runtime_dir),
        "SNAPFS_CACHE_DIR": str(base / "cache")})
    snapfs.ok("init")
    return snapfs


def test_snapshot_create_prints_readmes_keys(repo_snapfs: Snapfs, tmp_path: Path) -> None:
    keys, optional = created_keys()
    image = random_image(tmp_path / "create.img", 1 * MiB, seed=1)
    first = repo_snapfs.json("snapshot", "create", image)
    keys.check(first, "snapshot create (no parent)", optional)
    assert sorted(optional & set(first)) == []  # "left out when there is none"
    write_at(image, 0, os.urandom(4096))
    second = repo_snapfs.json("snapshot", "create", image)
    assert second["parent"] == first["id"]
    keys.check(second, "snapshot create (with a parent)")


def test_verify_unlock_and_repair_print_readmes_keys(repo_snapfs: Snapfs, tmp_path: Path) -> None:
    repo_snapfs.ok("snapshot", "create", random_image(tmp_path / "v.img", 256 * 1024, seed=2))
    verified = repo_snapfs.json("verify")
    assert verified["ok"] is True
    assert {k for k, where in IN_PASSING.items() if where == "verify"} <= set(verified)
    repaired = repo_snapfs.json("repair", "index")
    assert {k for k, where in IN_PASSING.items() if where == "repair index"} <= set(repaired)
    # a lock object that cannot be read: unlock removes it and says so under its key
    (Path(str(repo_snapfs.repo)) / "locks" / "not-a-lock").write_bytes(b"\x00 torn")
    unlocked = repo_snapfs.json("unlock")
    assert unlocked["unreadable_removed"] == ["not-a-lock"]
    assert {k for k, where in IN_PASSING.items() if where == "unlock"} <= set(unlocked)


# -- with a mount -----------------------------------------------------------------------------


def mounts(test: Any) -> Any:
    """``MOUNTS`` for one test (the module's others need no root)."""
    for mark in MOUNTS:
        test = mark(test)
    return test


@pytest.fixture(scope="module")
def served(repo_snapfs: Snapfs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The repository mounted, with a snapshot ``fs`` of an ext4 holding one file ``etc/a``
    and a disk ``d`` made from it."""
    tmp = tmp_path_factory.mktemp("served")
    tree = tmp / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "a").write_bytes(os.urandom(10_000))
    image = tmp / "fs.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image), "8M"], check=True,
                   capture_output=True)
    repo_snapfs.ok("snapshot", "create", image, "--name", "fs")
    with mounted(repo_snapfs, tmp / "mnt", Path(repo_snapfs.env["SNAPFS_CACHE_DIR"]),
                 "--lock-patience", "60") as daemon:
        served = Served(repo_snapfs, daemon, tmp)
        repo_snapfs.ok("disk", "create", "d", "--from", "fs")
        yield served


@mounts
def test_disk_snapshots_print_readmes_keys(served: Served) -> None:
    listed = served.disks()["d"]
    disk_list_keys().check(listed, "disk list")
    assert "blocks_staged_now" in listed
    write_at(served.disk("d"), 0, os.urandom(16384))
    task = served.snapshot("--disk", "d")
    assert task["state"] == "accomplished", task
    task_list, part_list, stored = task_keys()
    task_list.check(task, "snapshot create --disk")
    assert {"stuck", "consistency"} <= set(task)
    (part,) = task["parts"]
    part_list.check(part, "snapshot create --disk: a part")
    stored.check(part["snapshot"], "snapshot create --disk: the stored snapshot")

    # one not stored yet: snapshot list gives why (reason) and what keeps it (read_by)
    write_at(served.disk("d"), 0, os.urandom(16384))
    with uploads_held(served.snapfs):
        task = served.snapshot("--disk", "d", "--no-wait")
        (part,) = task["parts"]
        listed = {s["id"]: s for s in served.snapfs.json("snapshot", "list")}
        waiting = listed[part["snapshot_id"]]
        assert waiting["state"] == "progressing"
        assert {k for k, where in IN_PASSING.items() if where == "snapshot list"} <= \
            set(waiting)
    wait_for(lambda: served.snapshots()[part["name"]]["state"] == "accomplished", 60,
             "the held upload to be stored")

    # a consistency group: its members count themselves
    served.snapfs.ok("disk", "create", "e", "--from", "fs")
    task = served.snapshot("--disk", "d", "--disk", "e")
    assert task["state"] == "accomplished", task
    listed = {s["id"]: s for s in served.snapfs.json("snapshot", "list")}
    for part in task["parts"]:
        member = listed[part["snapshot_id"]]
        assert {k for k, where in IN_PASSING.items() if where == "snapshot list of a group"} \
            <= set(member)
        assert (member["group_size"], member["group_stored"]) == (2, 2)


@mounts
def test_stats_prints_readmes_keys(served: Served) -> None:
    stats = served.snapfs.json("stats", served.mountpoint)
    top, nested = stats_keys()
    top.check(stats, "stats")
    for key, keys in nested.items():
        figures = stats[key]
        for doc in figures.values() if key == "images" else [figures]:
            keys.check(doc, f"stats: {key}")
    assert stats["images"], "stats names no image: the per-image keys were not checked"


@mounts
def test_restore_files_prints_readmes_keys(served: Served) -> None:
    done = served.snapfs("restore-files", "fs", "--to", served.tmp / "restored",
                         "--include", "etc", "--include", "nothing/here", "--json")
    assert done.returncode == 0, done
    report = json.loads(done.stdout)
    assert report["unmatched_includes"] == ["nothing/here"]
    assert report["restored"] == 1
    assert (served.tmp / "restored" / "etc" / "a").read_bytes() == \
        (served.tmp / "tree" / "etc" / "a").read_bytes()

    # a read-only target stops it at once: the report so far, with the error
    target = served.tmp / "read-only"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1M", "tmpfs", str(target)],
                   check=True)
    try:
        stopped = served.snapfs("restore-files", "fs", "--to", target, "--json")
    finally:
        subprocess.run(["umount", str(target)], check=True)
    assert stopped.returncode != 0, stopped
    report = json.loads(stopped.stdout)
    assert report["error"] and report["error"] in stopped.stderr, (report, stopped.stderr)
