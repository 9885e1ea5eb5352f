"""``python -m snapfs`` is the ``snapfs`` command."""

from snapfs.cli import main

main()
