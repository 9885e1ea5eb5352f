"""``snapfs mount``, ``snapfs umount``, ``snapfs stats``: a repository's snapshots as image files.

Thin: options become a ``MountOptions`` and go to ``snapfs.mount``; ``umount`` and ``stats`` go
to ``snapfs.control``, which finds the daemon from the mount point alone.
"""

from __future__ import annotations

import os
import re
from typing import Any

import click

from snapfs.cli.context import CliConfig, not_empty, pass_config
from snapfs.cli.output import emit_json, human_size, parse_size, table_lines
from snapfs.errors import MountBusy, UsageError
from snapfs.plural import counted


def default_cache_dir() -> str:
    return os.environ.get("SNAPFS_CACHE_DIR") or os.path.expanduser("~/.cache/snapfs")


#: the smallest ``--cache-size``: a cache must hold at least what the fetch workers write to it
#: at once (8 runs of up to 1 MiB for reads, 4 MiB in the background) and a segment of its own
#: (1 MiB at least), or it evicts blocks before anyone reads them back; 0, or a few KiB, is a
#: typo, never a choice
MIN_CACHE_SIZE = 16 << 20

_DURATION_UNITS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "": 1e-3}
_RATE_UNITS = {"": 1e6, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9,
               "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


def parse_duration(text: str) -> float:
    """``20ms``, ``0.5s``, ``250us`` (a bare number is milliseconds) -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(us|µs|ms|s)?\s*", text)
    if not m:
        raise UsageError(f"not a duration: {text!r} (try 20ms or 0.5s)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2) or ""]


def parse_rate(text: str) -> float:
    """``100MB/s``, ``1.5GB/s``, ``50MiB/s`` (a bare number is MB/s, 10^6 bytes) -> bytes/s."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]?i?b)?(?:/s)?\s*", text, re.IGNORECASE)
    if not m or (m.group(2) or "").lower() not in _RATE_UNITS:
        raise UsageError(f"not a rate: {text!r} (try 100MB/s)")
    return float(m.group(1)) * _RATE_UNITS[(m.group(2) or "").lower()]


@click.command()
@click.argument("mountpoint", callback=not_empty)
@click.option("--cache-dir", metavar="DIR", callback=not_empty,
              help="Local block cache, kept across mounts "
              "(default: $SNAPFS_CACHE_DIR or ~/.cache/snapfs).")
@click.option("--cache-size", default="20G", show_default=True, metavar="SIZE",
              help="Cap on the cache's size (K, M, G, T).")
@click.option("--foreground", is_flag=True, help="Stay attached; Ctrl-C unmounts.")
@click.option("--no-background", is_flag=True,
              help="Fetch only what is read (and read-ahead, hints): no background hydration.")
@click.option("--hydrate-rate", type=float, metavar="MB/s",
              help="Cap background hydration (10^6 bytes/s); reads are never capped.")
@click.option("--read-around", default="64K", show_default=True, metavar="SIZE",
              help="Stored bytes on each side of a block a read waits for that its GET also "
              "brings, if not cached (0: only what is read).")
@click.option("--prefetch-list", type=click.Path(dir_okay=False), metavar="FILE",
              callback=not_empty,
              help="Fetch these first: lines of 'NAME.img' or 'NAME.img OFFSET LENGTH' (4K, 1M); "
                   "'#' begins a comment line.")
@click.option("--allow-other", is_flag=True,
              help="Let every user read the images (needs user_allow_other if not root).")
@click.option("--simulate-latency", metavar="20ms",
              help="Add this latency to every store request (for measurements).")
@click.option("--simulate-bandwidth", metavar="100MB/s",
              help="Cap the link to the store at this rate (for measurements).")
@click.option("--lock-patience", type=float, metavar="SECONDS",
              help="How long each attempt of a disk snapshot's upload waits for a garbage "
              "collection's lock before it fails (default: 10).")
@click.option("--refresh-interval", type=float, metavar="SECONDS",
              help="How often at most a lookup of an unknown name or a listing of snapshots/ "
              "reads the repository's snapshot list again (default: 2).")
@click.option("--reserve-interval", type=float, metavar="SECONDS",
              help="How often the cache makes sure it leaves its file system's reserve free, "
              "also while it caches nothing (default: 2).")
@pass_config
def mount(config: CliConfig, mountpoint: str, cache_dir: str | None, cache_size: str,
          foreground: bool, no_background: bool, hydrate_rate: float | None,
          read_around: str, prefetch_list: str | None, allow_other: bool, simulate_latency: str | None,
          simulate_bandwidth: str | None, lock_patience: float | None,
          refresh_interval: float | None, reserve_interval: float | None) -> None:
    """Serve every snapshot of REPO as MOUNTPOINT/snapshots/NAME.img, fetched as it is read."""
    from snapfs.mount import MountOptions  # light: the daemon's libraries load after the fork
    from snapfs.mount import mount as mount_repository

    if hydrate_rate is not None and not hydrate_rate > 0:  # (nan too)
        raise UsageError("--hydrate-rate must be a positive number of MB/s")
    for name, seconds in (("--lock-patience", lock_patience),
                          ("--refresh-interval", refresh_interval),
                          ("--reserve-interval", reserve_interval)):
        if seconds is not None and not 0 < seconds < float("inf"):  # (nan too)
            raise UsageError(f"{name} must be a positive number of seconds")
    capacity = parse_size(cache_size)
    if capacity < MIN_CACHE_SIZE:
        raise UsageError(f"--cache-size must be at least {MIN_CACHE_SIZE >> 20}M (got {cache_size})")
    options = MountOptions(
        repository=config.require_repo(),
        endpoint_url=config.endpoint_url,
        mountpoint=mountpoint,
        cache_dir=cache_dir or default_cache_dir(),
        cache_size=capacity,
        foreground=foreground,
        allow_other=allow_other,
        debug=config.debug,
        background=not no_background,
        hydrate_rate=hydrate_rate * 1e6 if hydrate_rate else None,
        read_around=parse_size(read_around),
        prefetch_list=os.path.abspath(prefetch_list) if prefetch_list else None,
        simulate_latency=parse_duration(simulate_latency) if simulate_latency else None,
        simulate_bandwidth=parse_rate(simulate_bandwidth) if simulate_bandwidth else None,
        lock_patience=lock_patience,
        refresh_interval=refresh_interval,
        reserve_interval=reserve_interval,
    )
    mount_repository(options, click.echo)


# MOUNTPOINT is a plain string, not a click.Path, for umount and stats: click stat()s a Path,
# and a hung daemon never answers a stat of its mount point (see control.real_path)
@click.command()
@click.argument("mountpoint", callback=not_empty)
@click.option("--timeout", default=60.0, show_default=True, metavar="SECONDS",
              help="How long to wait for the daemon to exit before killing it.")
def umount(mountpoint: str, timeout: float) -> None:
    """Unmount MOUNTPOINT and wait until its daemon has exited (also cleans up after a daemon
    that died)."""
    from snapfs.control import real_path, unmount

    if not timeout > 0:  # 0 or less killed the daemon at once, with its uploads and profiles
        raise UsageError("--timeout must be a positive number of seconds")

    try:
        said = unmount(mountpoint, timeout)
    except MountBusy:
        # a browse's loop device holds the image, which fuser -m does not show: name the browse
        from snapfs.browse import all_states

        where = real_path(mountpoint)
        browsed = [s.directory for s in all_states() if s.daemon_mountpoint == where]
        if not browsed:
            raise
        raise MountBusy(f"{where} is busy: browsed at {', '.join(browsed)}; undo it first with: "
                         f"snapfs unbrowse {browsed[0]}") from None
    click.echo(said)


@click.command()
@click.argument("mountpoint", callback=not_empty)
@click.option("--json", "json_output", is_flag=True, help="Print the daemon's raw statistics.")
def stats(mountpoint: str, json_output: bool) -> None:
    """Show how far each image is hydrated and how the store is doing."""
    from snapfs.control import daemon_stats

    doc = daemon_stats(mountpoint)
    if json_output:
        emit_json(doc)
    else:
        for line in format_stats(doc):
            click.echo(line)


# -- the human view ------------------------------------------------------------------------------


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds // 60 % 60:02d}m"


def _ms(value: Any) -> str:
    return f"{value:.1f} ms" if isinstance(value, int | float) else "-"


def _hydrated(image: dict[str, Any]) -> str:
    fraction = image.get("hydrated_fraction")
    if isinstance(fraction, int | float):
        return f"{fraction * 100:.1f}%"
    # the sweep scans and hydrates the images in use only (a daemon before that had no key)
    return "not in use" if image.get("in_use") is False else "scanning"


def format_stats(doc: dict[str, Any]) -> list[str]:
    """The ``stats`` table: one row per image, then the store and cache figures."""
    h = doc.get("hydrator", {})
    cache = doc.get("cache", {})
    simulated = f", simulated: {doc['simulated']}" if doc.get("simulated") else ""
    lines = [f"{doc.get('repository')} at {doc.get('mountpoint')} "
             f"(pid {doc.get('pid')}, up {_duration(doc.get('uptime_seconds'))}{simulated})", ""]
    rows = [("IMAGE", "SIZE", "HYDRATED", "MISSING", "LEFT", "READS", "HITS", "FETCHED", "WAITED")]
    missing_blocks = missing_bytes = 0
    for name, image in doc.get("images", {}).items():
        missing = image.get("blocks_missing")
        missing_blocks += missing or 0
        missing_bytes += image.get("bytes_missing") or 0
        rows.append((name, human_size(image.get("size", 0)), _hydrated(image),
                     counted(missing, "block") if missing is not None else "-",
                     _duration(image.get("eta_seconds")) if missing else "-",
                     str(image.get("reads", 0)), str(image.get("cache_hits", 0)),
                     counted(image.get("blocks_fetched", 0), "block"),
                     f"{image.get('wait_seconds', 0):.2f} s"))
    if len(rows) == 1:
        lines.append("no snapshots in the repository yet")
    else:
        lines += table_lines(rows)
    lines.append("")
    lines.append(f"fetched     {counted(h.get('blocks_fetched', 0), 'block')}, "
                 f"{human_size(h.get('bytes_fetched', 0))} in {counted(h.get('requests', 0), 'request')} "
                 f"({h.get('failed_requests', 0)} failed, {h.get('corrupt_blocks', 0)} corrupt)")
    lines.append(f"latency     p50 {_ms(h.get('fetch_latency_ms_p50'))}, "
                 f"p99 {_ms(h.get('fetch_latency_ms_p99'))} per request")
    lines.append(f"waiting     reads waited on the store for {counted(h.get('waiting_reads', 0), 'block')}, "
                 f"{h.get('wait_seconds', 0):.2f} s in all")
    lines.append(f"cache       {counted(h.get('cache_hits', 0), 'hit')}; "
                 f"{human_size(cache.get('bytes', 0))} of {human_size(cache.get('capacity', 0))} "
                 f"used ({counted(cache.get('blocks', 0), 'block')})"
                 + (f"; not caching: its file system is down to {human_size(cache.get('free', 0))} "
                    f"free, and it keeps {human_size(cache.get('reserve', 0))}"
                    if cache.get("short_of_space") else ""))
    done = h.get("background_blocks", 0)
    rate = h.get("background_rate_bytes_per_s") or 0
    background = f"{counted(done, 'block')} ({human_size(h.get('background_bytes', 0))}) so far"
    if missing_blocks and doc.get("background") is False:
        # hints give a rate for a while after the mount, but no sweep will fetch the rest
        background += f"; {missing_blocks} not fetched until read (no background hydration)"
    elif missing_blocks:
        eta = missing_bytes / rate if rate else None
        background += f"; {missing_blocks} to go at {human_size(rate)}/s, " + (
            f"about {_duration(eta)} left" if eta else "time left unknown")
    elif doc.get("images"):
        background += "; nothing left to fetch" if all(
            i.get("blocks_missing") == 0 for i in doc["images"].values()) else ""
    lines.append(f"background  {background}")
    return lines
