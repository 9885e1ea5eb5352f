"""snapfs: block-level disk snapshots in object storage, mounted instantly with lazy hydration.

The package is layered, and imports only point down this list:
``format`` (pure codecs) <- ``store`` (object stores) <- ``repo`` (snapshots, packs, index)
<- ``cli`` (click commands). Later layers (cache, hydration, image, FUSE) slot in above ``repo``.
"""

__version__ = "0.1.0"
