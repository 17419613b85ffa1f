"""What machined asks of others on the bus: systemd (PID 1 or the user's manager, ``systemd1``),
polkit (``polkit``), and the one place that turns their error replies into errors (``bus``).
Used by the core through narrow interfaces; neither front-end is imported here."""
