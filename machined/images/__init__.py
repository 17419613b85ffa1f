"""The image pool: the machine images on the search path, and what may be done with them.

- :mod:`.pool`: the search path, discovery, lookup, the image name rule and the pool's quota;
- :mod:`.lock`: the locks systemd-nspawn takes on images;
- :mod:`.metadata`: hostname, machine ID, machine-info, os-release of an image;
- :mod:`.operations`: remove, rename, clone, read-only, limits, clean (synchronous);
- :mod:`.service`: the use cases the bus calls, which decide where each runs (thread or
  worker child), apply deadlines and the operations cap, and check names and limits.
"""
