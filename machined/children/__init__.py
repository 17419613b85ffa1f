"""Children: jobs run in child processes, with deadlines; the daemon never enters a namespace itself.

Work that enters another namespace (setns affects a whole thread, and the daemon is threaded),
or that takes long (copies, image removal), runs in a child. What a child may run is a
:class:`~machined.children.jobs.Job` of :mod:`machined.children.jobs`, the one registry of
such functions. The module split follows the fork:

- :mod:`~machined.children.client`, the daemon's side: it asks the fork server for children,
  writes each its request, kills it at its deadline or when its caller goes away (through its
  pidfd), and holds the limits;
- :mod:`~machined.children.forkserver`, one single-threaded process, started at the first job
  and gone :data:`~machined.children.client.FORKSERVER_LINGER` seconds after its last child
  (a shell right after a copy finds it still there): it has imported what the jobs need and
  forks children ahead of time, *spares* that wait for a job, each handed to the daemon as a
  pidfd and one end of a stream socketpair, its *job socket*;
- :mod:`~machined.children.child`, a child's side: it reads its request and fds from the job
  socket, runs the job, may hand fds back, writes the outcome and exits (also run as
  ``python -m machined.children.child --job FD`` when the fork server cannot start);
- :mod:`~machined.children.wire`, what both sides share: the request and fds over sockets.

A child that dies or hangs costs only its caller an error; so does the death of the fork
server (its children die with it), which is started again at the next job. Looks need no
child (see :mod:`machined.inside.looks`): while no operation runs, the daemon is the
service's only process.

Every child, and every request to a helper, counts against one limit,
:data:`~machined.children.client.children` (64 at once, served root first and round-robin
across users; one unprivileged user runs at most 4 at once and queues at most 64 more, then
gets ``LimitsExceeded``). A child's slot is given back when the child has exited. Children
serving unprivileged users run at a lower CPU priority, so that a flood never slows the daemon
itself. Identical read-only probes in flight at the same time share one child. A deadline
covers the wait for a slot too. :class:`~machined.children.client.Operations` caps how many
long-running children run at once (64, as upstream's ``OPERATIONS_MAX``) and refuses more at
once, as upstream does.
"""
