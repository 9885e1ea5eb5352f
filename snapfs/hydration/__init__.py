"""Deciding what to fetch from the store next, and fetching it once.

``scheduler.Hydrator`` owns the fetch queue (waiting reads first, then read-ahead, then hints,
then the background sweep), the in-flight table that makes every block fetched at most once per
host, retries, and the statistics ``snapfs stats`` shows. It knows blocks and packs, not files:
the image layer above it maps offsets to blocks. ``budget.MemoryBudget`` caps the bytes every
image's read-ahead buffers hold together; ``stats`` holds the counters ``snapfs stats`` shows.
"""
