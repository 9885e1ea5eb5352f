"""A new repository's defaults, in a module of their own so that the CLI can show them in its
help without importing the codecs (``repository`` re-exports them)."""

DEFAULT_BLOCK_SIZE = 16 * 1024
DEFAULT_PACK_SIZE = 16 << 20
DEFAULT_COMPRESSION_LEVEL = 3
