"""The pure parts of ``snapfs mount``/``stats``: option parsing and the human stats view."""

from __future__ import annotations

import pytest

from snapfs.cli.mount import format_stats, parse_duration, parse_rate
from snapfs.errors import UsageError


@pytest.mark.parametrize("text, seconds", [("20ms", 0.02), ("0.5s", 0.5), ("250us", 0.00025),
                                           ("20", 0.02), (" 3 s ", 3.0)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text, rate", [("100MB/s", 100e6), ("1.5GB/s", 1.5e9), ("50MiB/s", 50 << 20),
                                        ("100", 100e6), ("512KB", 512e3)])
def test_rates(text: str, rate: float) -> None:
    assert parse_rate(text) == pytest.approx(rate)


@pytest.mark.parametrize("bad", ["soon", "-5ms", "5 minutes", "1e3ms"])
def test_bad_durations(bad: str) -> None:
    with pytest.raises(UsageError):
        parse_duration(bad)


@pytest.mark.parametrize("bad", ["fast", "10 TB/s", "MB/s", "10Mb/ss"])
def test_bad_rates(bad: str) -> None:
    with pytest.raises(UsageError):
        parse_rate(bad)


def test_stats_view_shows_progress_and_time_left() -> None:
    doc = {
        "repository": "s3://b/p", "mountpoint": "/mnt", "pid": 42, "uptime_seconds": 10.0,
        "images": {
            "vm-1.img": {"size": 64 << 20, "hydrated_fraction": 0.25, "blocks_missing": 300,
                         "bytes_missing": 300 << 14, "eta_seconds": 30.0, "reads": 7,
                         "bytes_read": 1 << 20, "cache_hits": 5, "blocks_fetched": 20,
                         "wait_seconds": 0.5},
            "new.img": {"size": 1 << 30, "hydrated_fraction": None, "blocks_missing": None},
        },
        "hydrator": {"blocks_fetched": 120, "bytes_fetched": 3 << 20, "requests": 9,
                     "failed_requests": 1, "corrupt_blocks": 0, "fetch_latency_ms_p50": 3.25,
                     "fetch_latency_ms_p99": 40.0, "waiting_reads": 20, "wait_seconds": 0.5,
                     "cache_hits": 5, "background_blocks": 100, "background_bytes": 2 << 20,
                     "background_rate_bytes_per_s": 160 << 10},
        "cache": {"bytes": 3 << 20, "capacity": 20 << 30, "blocks": 120},
    }
    text = "\n".join(format_stats(doc))
    assert "s3://b/p at /mnt (pid 42, up 10s)" in text
    assert "vm-1.img  64.0 MiB  25.0%" in text and "new.img" in text and "scanning" in text
    assert "p50 3.2 ms, p99 40.0 ms" in text or "p50 3.3 ms, p99 40.0 ms" in text
    assert "300 to go at 160.0 KiB/s, about 30s left" in text  # 4.7 MiB at 160 KiB/s
    assert "vm-1.img  64.0 MiB  25.0%     300 blocks  30s   7      5     20 blocks  0.50 s" in text
    assert "1 failed" in text and "5 hits" in text


def test_stats_view_counts_one_of_a_thing_in_the_singular() -> None:
    doc = {
        "repository": "/r", "mountpoint": "/mnt", "pid": 42, "uptime_seconds": 3.0,
        "images": {"vm-1.img": {"size": 1 << 20, "hydrated_fraction": 0.5, "blocks_missing": 1,
                                "bytes_missing": 1 << 14, "eta_seconds": 1.0, "reads": 1,
                                "cache_hits": 1, "blocks_fetched": 1, "wait_seconds": 0.0}},
        "hydrator": {"blocks_fetched": 1, "bytes_fetched": 1 << 14, "requests": 1,
                     "waiting_reads": 1, "cache_hits": 1, "background_blocks": 1,
                     "background_bytes": 1 << 14},
        "cache": {"bytes": 1 << 14, "capacity": 20 << 30, "blocks": 1},
    }
    lines = format_stats(doc)
    text = "\n".join(lines)
    assert "blocks" not in text and "requests" not in text and "hits" not in text, text
    assert "vm-1.img  1.0 MiB  50.0%     1 block  1s    1      1     1 block  0.00 s" in lines
    assert "fetched     1 block, 16.0 KiB in 1 request (0 failed, 0 corrupt)" in lines
    assert "waiting     reads waited on the store for 1 block, 0.00 s in all" in lines
    assert lines[-2] == ("cache       1 hit; 16.0 KiB of 20.0 GiB used (1 block)")
    assert lines[-1].startswith("background  1 block (16.0 KiB) so far")


def test_stats_view_promises_no_time_left_without_background_hydration() -> None:
    """A mount with ``--no-background`` (and browse's own daemon) fetches a few hints at
    first, which gives a rate: the view said "29795 to go at 108.0 KiB/s, about 1h 13m left"
    of blocks that nothing would fetch until they are read."""
    doc = {
        "repository": "/r", "mountpoint": "/mnt", "pid": 42, "uptime_seconds": 3.0,
        "background": False,
        "images": {"vm-1.img": {"size": 64 << 20, "hydrated_fraction": 0.5, "blocks_missing": 300,
                                "bytes_missing": 300 << 14, "eta_seconds": None, "reads": 1,
                                "cache_hits": 1, "blocks_fetched": 1, "wait_seconds": 0.0}},
        "hydrator": {"blocks_fetched": 11, "bytes_fetched": 11 << 14, "requests": 1,
                     "waiting_reads": 1, "cache_hits": 1, "background_blocks": 10,
                     "background_bytes": 10 << 14, "background_rate_bytes_per_s": 108 << 10},
        "cache": {"bytes": 11 << 14, "capacity": 20 << 30, "blocks": 11},
    }
    lines = format_stats(doc)
    assert lines[-1] == ("background  10 blocks (160.0 KiB) so far; 300 not fetched until read "
                         "(no background hydration)")
    assert "vm-1.img  64.0 MiB  50.0%     300 blocks  -     1" in "\n".join(lines)
