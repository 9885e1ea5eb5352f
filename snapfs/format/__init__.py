"""Pure codecs for everything snapfs stores: blocks, packs, indexes, manifests, the config.

Nothing here does I/O or knows about stores; every encoded object starts with a magic value
and a version, and decoding an unknown one raises ``FormatError``.
"""
