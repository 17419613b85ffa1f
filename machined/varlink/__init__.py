"""The varlink front-end: an asyncio varlink server (:mod:`.server`), interface definitions
(:mod:`.idl`, :mod:`.interfaces`) and the services machined offers over it: io.systemd.Machine
(:mod:`.machine`) and io.systemd.UserDatabase (:mod:`machined.userdb`)."""

from machined.varlink.server import Reply, Service, VarlinkError, VarlinkServer

__all__ = ["Reply", "Service", "VarlinkError", "VarlinkServer"]
