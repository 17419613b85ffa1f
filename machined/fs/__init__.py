"""File-system primitives, free of machines and images: the C library calls ``os`` lacks
(:mod:`.libc`), self-closing fds (:mod:`.fds`), inode attributes (:mod:`.attrs`), every
btrfs ioctl (:mod:`.btrfs`), the one tree copier and clones of trees (:mod:`.copy`), and
removal of trees (:mod:`.remove`). Synchronous and possibly slow: callers keep them off
the event loop."""
