"""Inside a machine: what the daemon reads and does inside a registered machine.

Looks (OS release, addresses, the UID shift, the root directory) need no process: the daemon
reads them itself through the leader it pinned by pidfd (``looks``), blocking reads in a few
threads under deadlines (``lookthreads``), addresses from one rtnetlink dump (``addresses``).
What needs the container's mount namespace (a PTY from its devpts, login, shell, copies,
binds) runs in a child started for it (``nsprobe``, ``machine_ops``, ``pty``, ``sessions``,
``shell``; children come from :mod:`machined.children`). ``access`` is the one entry the
front-ends use, ``machine_calls`` the calls both make on a machine's inside.
"""
