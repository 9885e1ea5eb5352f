"""A database application for ``test_db_consistency``: SQLite committing without pause, in a
process of its own, reporting every commit SQLite acknowledged.

    python dbwriter.py ACKS JOURNAL_MODE SYNCHRONOUS DB [DB ...]

Round n (1, 2, ...; or, if the databases hold rows already, the one after their head row: an
application that restarts) commits one transaction on each database in the order given: it inserts
row n (a key that scatters the index's entries over its pages, and a payload that spans several
pages) and sets the head row to n. Once SQLite's COMMIT returns, n is stored in that database's
slot of ACKS, a file of one int64 per database that the test maps too: a commit is reported only
after it was acknowledged, and before the next one begins, so a reading of ACKS is a lower bound
of what is durable and one more than it an upper bound of what may be on the disk.

It stops after the round in progress once the test asks (``Acks.request_stop``: a slot of ACKS,
not a signal, which could interrupt a system call of SQLite's), and exits 0. A failed commit (the
disk's daemon was killed) ends it with exit 3 and one line on stderr. ``expected_row`` is what
row n holds, for the test's check of a database it finds on a restored disk.
"""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import sqlite3
import sys
from pathlib import Path

PAYLOAD = 3 * 4096 + 917  # bytes per row: overflow pages, not one page


def expected_row(n: int) -> tuple[bytes, bytes]:
    """Row ``n``'s key and payload."""
    seed = n.to_bytes(8, "little")
    return hashlib.blake2b(seed, digest_size=16).digest(), hashlib.shake_256(seed).digest(PAYLOAD)


SCHEMA = [
    "CREATE TABLE IF NOT EXISTS rows (n INTEGER PRIMARY KEY, key BLOB NOT NULL, "
    "payload BLOB NOT NULL)",
    "CREATE INDEX IF NOT EXISTS rows_by_key ON rows (key)",
    "CREATE TABLE IF NOT EXISTS head (id INTEGER PRIMARY KEY CHECK (id = 1), n INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO head VALUES (1, 0)",
]


class Acks:
    """The ACKS file mapped: slot i is the last commit acknowledged on database i, and one more
    slot says whether the writer is asked to stop. Aligned native int64 stores and loads, so a
    reader never sees half of an update."""

    def __init__(self, path: Path, count: int, create: bool = False) -> None:
        if create:
            path.write_bytes(bytes(8 * (count + 1)))
        self.count = count
        self._file = open(path, "r+b")  # closed by close()
        self._map = mmap.mmap(self._file.fileno(), 8 * (count + 1))
        self._slots = (ctypes.c_int64 * (count + 1)).from_buffer(self._map)

    def __getitem__(self, i: int) -> int:
        assert 0 <= i < self.count
        return int(self._slots[i])

    def __setitem__(self, i: int, n: int) -> None:
        assert 0 <= i < self.count
        self._slots[i] = n

    def snapshot(self) -> list[int]:
        return list(self._slots[: self.count])

    def request_stop(self) -> None:
        self._slots[self.count] = 1

    @property
    def stop_requested(self) -> bool:
        return bool(self._slots[self.count])

    def close(self) -> None:
        del self._slots
        self._map.close()
        self._file.close()


def open_database(path: str, journal_mode: str, synchronous: str) -> sqlite3.Connection:
    con = sqlite3.connect(path, isolation_level=None)
    (mode,) = con.execute(f"PRAGMA journal_mode = {journal_mode}").fetchone()
    assert mode == journal_mode.lower(), mode
    con.execute(f"PRAGMA synchronous = {synchronous}")
    con.execute("BEGIN IMMEDIATE")
    for statement in SCHEMA:
        con.execute(statement)
    con.execute("COMMIT")
    return con


def main(argv: list[str]) -> int:
    acks_path, journal_mode, synchronous, *paths = argv
    acks = Acks(Path(acks_path), len(paths))
    try:
        cons = [open_database(p, journal_mode, synchronous) for p in paths]
        heads = {con.execute("SELECT n FROM head").fetchone()[0] for con in cons}
        assert len(heads) == 1, f"the databases were left at different rounds: {heads}"
        (n,) = heads
        while not acks.stop_requested:
            n += 1
            key, payload = expected_row(n)
            for i, con in enumerate(cons):
                con.execute("BEGIN IMMEDIATE")
                con.execute("INSERT INTO rows VALUES (?, ?, ?)", (n, key, payload))
                con.execute("UPDATE head SET n = ? WHERE id = 1", (n,))
                con.execute("COMMIT")
                acks[i] = n
        for con in cons:
            con.close()
    except (sqlite3.Error, OSError) as e:
        print(f"dbwriter: {type(e).__name__}: {e}", file=sys.stderr)
        return 3
    finally:
        acks.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
