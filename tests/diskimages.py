"""Disk images for repository and CLI tests, and the independent measures tests check them by.

Images are real: ``make_image`` runs ``tools/make-image`` (an ext4 filesystem of real files from
/usr), ``change_image`` runs ``tools/change-image`` (changes files through a loop mount, so ext4
decides which blocks move). ``random_image`` and ``sparse_image`` build raw disks whose content
the test controls exactly.

The measures (``block_contents``, ``same_bytes``, ``sha256_file``) read images directly and never
use snapfs code, so a test can compare what snapfs says it did with what the bytes say.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import socket
import struct
import subprocess
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAKE_IMAGE = ROOT / "tools" / "make-image"
CHANGE_IMAGE = ROOT / "tools" / "change-image"

MiB = 1 << 20


def make_image(out: Path, size: str = "64M", data: str = "24M", seed: int = 0) -> Path:
    subprocess.run(
        [str(MAKE_IMAGE), str(out), "--size", size, "--data", data, "--seed", str(seed)],
        check=True, capture_output=True, timeout=120,
    )
    return out


def change_image(image: Path, percent: float = 1.0, seed: int = 0) -> Path:
    subprocess.run(
        [str(CHANGE_IMAGE), str(image), "--percent", str(percent), "--seed", str(seed)],
        check=True, capture_output=True, timeout=120,
    )
    return image


def copy_image(src: Path, dst: Path) -> Path:
    """A copy that keeps holes (so a 64M image with 24M of files stays small on disk)."""
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)
    return dst


def random_image(out: Path, size: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(out, "wb") as f:
        left = size
        while left:
            n = min(left, 4 * MiB)
            f.write(rng.randbytes(n))
            left -= n
    return out


def write_at(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_blocks(path: Path, blocks: dict[int, bytes], block_size: int = 16 * 1024) -> None:
    """pwrite each block at its number (in ``block_size`` units: snapfs init's default), then
    fsync."""
    fd = os.open(path, os.O_RDWR)
    try:
        for n, data in blocks.items():
            assert os.pwrite(fd, data, n * block_size) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def release_fifo_reader(path: Path) -> bool:
    """Let a process blocked opening the FIFO ``path`` for reading go on, by opening it for
    writing. Whether anyone had it open for reading (else nothing happens)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        return False
    return True


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def is_zero(block: bytes) -> bool:
    return block.count(0) == len(block)


def nonzero_blocks(path: Path, block_size: int) -> dict[int, bytes]:
    """Block number -> plain bytes of every block of ``path`` that is not all zeros (the last
    block may be short). Only allocated regions are read: holes read as zeros anyway."""
    out: dict[int, bytes] = {}
    seen: set[int] = set()
    with open(path, "rb") as f:
        for start, end in data_extents(path):
            for n in range(start // block_size, -(-end // block_size)):
                if n in seen:
                    continue
                seen.add(n)
                f.seek(n * block_size)
                block = f.read(block_size)
                if block and not is_zero(block):
                    out[n] = block
    return out


def block_hashes(path: Path, block_size: int) -> dict[int, bytes]:
    """Block number -> sha256 of every non-zero block."""
    return {n: hashlib.sha256(b).digest() for n, b in nonzero_blocks(path, block_size).items()}


def distinct_nonzero(path: Path, block_size: int) -> dict[bytes, bytes]:
    """sha256 -> plain bytes of every distinct non-zero block of ``path``."""
    return {hashlib.sha256(b).digest(): b for b in nonzero_blocks(path, block_size).values()}


def changed_blocks(before: dict[int, bytes], after: dict[int, bytes]) -> set[int]:
    """Block numbers whose content differs between two ``block_hashes`` results."""
    return {n for n in before.keys() | after.keys() if before.get(n) != after.get(n)}


def data_extents(path: Path) -> list[tuple[int, int]]:
    """(start, end) of the allocated regions of a (sparse) file."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            out.append((start, end))
            pos = end
    finally:
        os.close(fd)
    return out


def same_bytes(a: Path, b: Path) -> bool:
    """Whether two (possibly huge, sparse) files hold the same bytes.

    Only the union of both files' data regions is read and compared; everywhere else both are
    holes, which read as zeros. Cheaper than hashing a 1 GiB file of mostly holes."""
    size = os.path.getsize(a)
    if os.path.getsize(b) != size:
        return False
    regions = sorted(data_extents(a) + data_extents(b))
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for start, end in regions:
            pos = start
            while pos < end:
                n = min(end - pos, 4 * MiB)
                fa.seek(pos)
                fb.seek(pos)
                if fa.read(n) != fb.read(n):
                    return False
                pos += n
    return True


def make_socket(path: Path) -> None:
    """A Unix socket file at ``path``, bound through ``/proc/self/fd`` so that a long path
    (pytest's tmp_path) still fits in sun_path."""
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(f"/proc/self/fd/{fd}/{path.name}")
    finally:
        os.close(fd)


def have_root() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


def shared_image(base_dir: Path, name: str, build: Callable[[Path], Path]) -> Path:
    """``base_dir/name``, built by ``build(path)`` the first time any test module asks for it.

    Built under a temporary name and renamed, so a half-built image is never reused."""
    path = base_dir / name
    if not path.exists():
        base_dir.mkdir(parents=True, exist_ok=True)
        partial = base_dir / f".{name}.partial"
        partial.unlink(missing_ok=True)
        build(partial)
        partial.rename(path)
    return path


def standard_images(base_temp: Path) -> tuple[Path, Path, Path]:
    """The images the repository and CLI tests share (under pytest's session base temp dir):
    a 64 MiB ext4 image with ~24 MiB of real files, the same with ~1% of its file data changed
    through the filesystem (needs root), and a second ext4 image of other files."""
    d = base_temp / "shared-images"
    base = shared_image(d, "base.img", lambda p: make_image(p, seed=1))
    changed = shared_image(d, "changed.img",
                           lambda p: change_image(copy_image(base, p), percent=1, seed=2))
    other = shared_image(d, "other.img", lambda p: make_image(p, seed=3))
    return base, changed, other


#: GPT partition type of a Linux filesystem
LINUX_FILESYSTEM = "0fc63daf-8483-4772-8e79-3d69d8477de4"
SECTOR = 512


def partitioned_image(out: Path, table: str, parts: list[tuple[int, str | Path | None]],
                      size: int | None = None) -> list[int]:
    """A disk image with an MBR (``table="dos"``) or GPT partition table, written here byte by
    byte (no partitioning tool is needed), and a filesystem in each partition: ``parts`` are
    (size in bytes, content), content a directory to make an ext4 of (``mkfs.ext4 -d``),
    ``"swap"`` for ``mkswap``, or None for an empty partition. Partitions start at 1 MiB and
    follow each other on MiB boundaries. Returns each partition's offset in bytes."""
    offsets, at = [], MiB
    for part_size, _ in parts:
        offsets.append(at)
        at += part_size
    size = size or at + MiB  # room for GPT's backup at the end
    with open(out, "wb") as f:
        f.truncate(size)
    sectors = size // SECTOR
    spans = [(o // SECTOR, s // SECTOR) for o, (s, _) in zip(offsets, parts, strict=True)]
    if table == "dos":
        boot = bytearray(SECTOR)
        for i, (start, count) in enumerate(spans):
            boot[446 + 16 * i : 462 + 16 * i] = struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x83,
                                                            b"\0\0\0", start, count)
        boot[510:] = b"\x55\xaa"
        write_at(out, 0, bytes(boot))
    else:
        _write_gpt(out, sectors, spans)
    for offset, (part_size, content) in zip(offsets, parts, strict=True):
        if content == "swap":
            with open(out, "r+b") as f:  # mkswap has no offset: a swap header by hand
                page = bytearray(4096)
                page[1024:1036] = struct.pack("<III", 1, part_size // 4096 - 1, 0)
                page[4086:] = b"SWAPSPACE2"
                f.seek(offset)
                f.write(page)
        elif content is not None:
            subprocess.run(["mkfs.ext4", "-q", "-F", "-E", f"offset={offset}", "-d", str(content),
                            "-L", Path(content).name, str(out), f"{part_size // 1024}k"],
                           check=True, capture_output=True)
    return offsets


def _write_gpt(out: Path, sectors: int, spans: list[tuple[int, int]]) -> None:
    """A protective MBR, GPT headers (primary at LBA 1, backup at the last LBA) and 128
    partition entries of 128 bytes (32 sectors) after each header / before the backup."""
    protective = bytearray(SECTOR)
    protective[446:462] = struct.pack("<B3sB3sII", 0, b"\0\0\0", 0xEE, b"\0\0\0", 1,
                                      min(sectors - 1, 0xFFFFFFFF))
    protective[510:] = b"\x55\xaa"
    entries = bytearray(128 * 128)
    for i, (start, count) in enumerate(spans):
        entries[128 * i : 128 * (i + 1)] = (
            uuid.UUID(LINUX_FILESYSTEM).bytes_le + uuid.uuid4().bytes_le
            + struct.pack("<QQQ", start, start + count - 1, 0)
            + f"part{i + 1}".encode("utf-16-le").ljust(72, b"\0"))
    entries_crc = zlib.crc32(entries)
    disk_guid = uuid.uuid4().bytes_le

    def header(current: int, backup: int, entries_lba: int) -> bytes:
        fields = [b"EFI PART", 0x00010000, 92, 0, 0, current, backup, 34, sectors - 34,
                  disk_guid, entries_lba, 128, 128, entries_crc]
        crc = zlib.crc32(struct.pack("<8sIIIIQQQQ16sQIII", *fields))
        fields[3] = crc
        return struct.pack("<8sIIIIQQQQ16sQIII", *fields).ljust(SECTOR, b"\0")

    write_at(out, 0, bytes(protective) + header(1, sectors - 1, 2) + bytes(entries))
    write_at(out, (sectors - 33) * SECTOR, bytes(entries) + header(sectors - 1, 1, sectors - 33))
