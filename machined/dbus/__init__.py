"""The D-Bus front-end: org.freedesktop.machine1's objects (Manager, Machine, Image), their
dispatch with sd-bus's semantics, introspection and LogControl1. It turns calls into the core's
use cases (machined.lifecycle, machined.inside.machine_calls, machined.images) and their errors into
D-Bus errors; the varlink front-end (machined.varlink) calls the same functions."""
