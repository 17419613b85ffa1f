"""Keep a dbus-fast connection alive when the socket is momentarily full.

dbus-fast's asyncio writer (as dbus-next's, issue #153 there) treats EAGAIN from
``send()`` as a fatal error and drops the connection. That happens when a large
message is still being written and another one is queued: the writer tries to
send at once, the kernel buffer is full, and the daemon loses the bus. This
replaces the writer's callback with one that waits for the socket to become
writable instead. Applied once, at start-up, before connecting.
"""

from __future__ import annotations

import array
import socket
from typing import Any

from dbus_fast.aio import message_bus as _aio


def _write_callback(self: Any, remove_writer: bool = True) -> None:
    sock = self.sock
    try:
        while True:
            if self.buf is None:
                if not self.messages:
                    if remove_writer:
                        self.loop.remove_writer(self.fd)
                    return
                buf, unix_fds, fut = self.messages.popleft()
                self.unix_fds = unix_fds
                self.buf = memoryview(buf)
                self.offset = 0
                self.fut = fut
            try:
                if self.unix_fds and self.negotiate_unix_fd:
                    ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", self.unix_fds))]
                    self.offset += sock.sendmsg([self.buf[self.offset :]], ancdata)
                    self.unix_fds = None
                else:
                    self.offset += sock.send(self.buf[self.offset :])
            except BlockingIOError:
                # Full for now: continue when the loop says the socket is writable again.
                self.loop.add_writer(self.fd, self.write_callback)
                return
            if self.offset < len(self.buf):
                self.loop.add_writer(self.fd, self.write_callback)
                return
            self.buf = None
            if self.fut is not None and not self.fut.done():
                self.fut.set_result(None)
    except Exception as e:
        if self.fut is not None and not self.fut.done():
            if self.bus._user_disconnect:
                self.fut.set_result(None)
            else:
                self.fut.set_exception(e)
                # Sends are often not awaited (signals, replies): the connection's end is
                # reported by the bus itself, not as "Future exception was never retrieved".
                self.fut.exception()
        self.bus._finalize(e)


def apply() -> None:
    """Install the fixed write callback on dbus-fast's asyncio message writer."""
    _aio._MessageWriter.write_callback = _write_callback  # type: ignore[method-assign]  # the fix replaces it
