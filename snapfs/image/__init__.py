"""What an image *is*: offsets and lengths turned into blocks and bytes.

``view.ImageView`` reads one snapshot as a flat image through the hydrator; ``catalog`` keeps
the set of images a mount serves in step with the repository; ``sweep`` drives hints and the
background hydration of every image. Nothing here imports pyfuse3: tests call these classes
directly, and the FUSE adapter is a thin layer on top.
"""
