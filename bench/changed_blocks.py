#!/usr/bin/env python3
"""Count the blocks that differ between two disk images, at several block sizes.

    python bench/changed_blocks.py BEFORE.img AFTER.img [--sizes 4K,8K,...] [--json OUT]

A block counts only if it is not all zero in both images (a snapshot never stores those);
it is changed if any byte of it differs. All sizes are measured in one pass over the two
files: the finest size decides per fine block, and every coarser size (a multiple of it) is
the OR over its fine blocks. An image shorter than the other reads as zeros past its end.

Standard library only, so that it runs anywhere the images are.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

DEFAULT_SIZES = "4K,8K,16K,32K,64K,128K,1M"
UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in UNITS:
        return int(text[:-1]) * UNITS[text[-1]]
    return int(text)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def compare(before: str, after: str, sizes: list[int]) -> list[dict[str, float | int]]:
    """Per block size: blocks used (nonzero in either image), blocks changed, their bytes."""
    fine = min(sizes)
    coarse = max(sizes)
    if any(s % fine for s in sizes):
        raise ValueError("every block size must be a multiple of the smallest")
    # Read in steps of the coarsest size so that every block lies in one step.
    step = coarse
    zero_fine = bytes(fine)
    zero_step = bytes(step)
    length = max(os.path.getsize(before), os.path.getsize(after))
    used = dict.fromkeys(sizes, 0)
    changed = dict.fromkeys(sizes, 0)
    per_step = step // fine
    with open(before, "rb") as fa, open(after, "rb") as fb:
        for _ in range(0, length, step):
            a = fa.read(step)
            b = fb.read(step)
            # Pad short reads (end of image, or a shorter image) with zeros.
            a = a + bytes(step - len(a)) if len(a) < step else a
            b = b + bytes(step - len(b)) if len(b) < step else b
            if a == b:
                if a == zero_step:
                    continue
                nz = [a[i * fine : (i + 1) * fine] != zero_fine for i in range(per_step)]
                ch = [False] * per_step
            else:
                nz = []
                ch = []
                for i in range(per_step):
                    sa = a[i * fine : (i + 1) * fine]
                    sb = b[i * fine : (i + 1) * fine]
                    nz.append(sa != zero_fine or sb != zero_fine)
                    ch.append(sa != sb)
            for size in sizes:
                k = size // fine
                for j in range(0, per_step, k):
                    if any(nz[j : j + k]):
                        used[size] += 1
                        if any(ch[j : j + k]):
                            changed[size] += 1
    rows: list[dict[str, float | int]] = []
    for size in sorted(sizes):
        rows.append(
            {
                "block_size": size,
                "blocks_used": used[size],
                "blocks_changed": changed[size],
                "percent_changed": 100 * changed[size] / used[size] if used[size] else 0.0,
                "bytes_changed": changed[size] * size,
            }
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Count blocks that differ between two images, ignoring all-zero blocks."
    )
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--sizes", default=DEFAULT_SIZES,
                        help=f"comma-separated block sizes (default {DEFAULT_SIZES})")  # fmt: skip
    parser.add_argument("--json", metavar="OUT", help="also write the rows as JSON here")
    args = parser.parse_args()
    try:
        sizes = sorted({parse_size(s) for s in args.sizes.split(",") if s.strip()})
        if not sizes or min(sizes) <= 0:
            raise ValueError("no block sizes")
        rows = compare(args.before, args.after, sizes)
    except (OSError, ValueError) as e:
        print(f"changed_blocks: {e}", file=sys.stderr)
        return 1
    print(f"{'block':>6} {'used':>9} {'changed':>8} {'changed %':>10} {'changed bytes':>14}")
    for r in rows:
        print(
            f"{human(r['block_size']):>6} {r['blocks_used']:>9} {r['blocks_changed']:>8}"
            f" {r['percent_changed']:>9.2f}% {human(r['bytes_changed']):>14}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"before": args.before, "after": args.after, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
