"""The local block cache: verified, decompressed blocks kept on this host.

One cache per host (a directory), shared by every mount and every repository, capped in size
and kept across restarts. It holds only read-only data: a disk's own written blocks live in its
overlay (``write/overlay``), which is never evicted.
"""

from snapfs.cache.blockcache import BlockCache

__all__ = ["BlockCache"]
