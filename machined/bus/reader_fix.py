"""Read one message per wakeup of the event loop instead of reading until the socket is empty.

On a connection that passes file descriptors, dbus-fast's reader reads message after
message until a read fails with EAGAIN. So every call the daemon answers costs one more
``recvmsg`` and an exception (an OSError with its strerror, a traceback frame in the
compiled reader) only to learn that nothing else came: measured on the daemon's own
dispatcher, 10-30 % of its CPU time per lookup. asyncio's epoll is level-triggered: a
reader that returns after each message is called again at once while more is waiting.
dbus-fast reads such a connection exactly, message by message (the fixed header, then
the rest), so nothing of a next message is ever left in its buffer when it returns.
Connections without descriptor passing read greedily and stop at an empty buffer already;
they keep dbus-fast's reader. Applied once, at start-up, before connecting.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from functools import partial
from typing import Any

from dbus_fast._private.unmarshaller import Unmarshaller
from dbus_fast.aio import message_bus as _aio
from dbus_fast.aio.message_reader import _message_reader, build_message_reader

_dbus_fasts = build_message_reader


def one_message_per_wakeup(sock: socket.socket | None, process: Callable[[Any], None],
                           finalize: Callable[[Exception | None], None],
                           negotiate_unix_fd: bool) -> Callable[[], None]:  # fmt: skip
    """dbus-fast's reader, told to return after each message (its flag for connections that
    read greedily) while its unmarshaller still reads descriptors and exact lengths."""
    if not negotiate_unix_fd or sock is None:
        return _dbus_fasts(sock, process, finalize, negotiate_unix_fd)
    return partial(_message_reader, Unmarshaller(None, sock, True), process, finalize, False)


def apply() -> None:
    _aio.build_message_reader = one_message_per_wakeup  # type: ignore[attr-defined]
