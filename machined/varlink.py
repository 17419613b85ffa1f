"""A minimal varlink server: NUL-terminated JSON messages on a Unix socket.

machined 252 serves one varlink interface, ``io.systemd.UserDatabase`` on
``/run/systemd/userdb/io.systemd.Machine`` (nss-systemd, userdbctl and
systemd-userdbd connect there). Requests are answered one by one per
connection; a malformed message closes that connection only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

MAX_MESSAGE = 128 * 1024
METHOD_NOT_FOUND = "org.varlink.service.MethodNotFound"
INVALID_PARAMETER = "org.varlink.service.InvalidParameter"


class VarlinkError(Exception):
    def __init__(self, name: str, parameters: dict[str, Any] | None = None) -> None:
        super().__init__(name)
        self.name = name
        self.parameters = parameters or {}


Method = Callable[[dict[str, Any]], dict[str, Any]]


class VarlinkServer:
    """Serves *methods* (full method name → function of the parameters) on a socket path."""

    def __init__(self, path: str, methods: dict[str, Method], mode: int = 0o666) -> None:
        self.path = path
        self.methods = methods
        self.mode = mode
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        os.makedirs(os.path.dirname(self.path), mode=0o755, exist_ok=True)
        try:
            os.unlink(self.path)  # a socket left by an earlier instance
        except FileNotFoundError:
            pass
        self._server = await asyncio.start_unix_server(self._serve, path=self.path, limit=MAX_MESSAGE)
        os.chmod(self.path, self.mode)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    raw = await reader.readuntil(b"\0")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                reply = self._answer(raw[:-1])
                if reply is not None:
                    writer.write(json.dumps(reply, separators=(",", ":")).encode() + b"\0")
                    await writer.drain()
        except Exception:
            log.exception("varlink connection failed")
        finally:
            writer.close()

    def _answer(self, raw: bytes) -> dict[str, Any] | None:
        try:
            call = json.loads(raw)
            method = call["method"]
            params = call.get("parameters") or {}
            if not isinstance(method, str) or not isinstance(params, dict):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            return {"error": INVALID_PARAMETER, "parameters": {"parameter": "method"}}
        handler = self.methods.get(method)
        try:
            if handler is None:
                raise VarlinkError(METHOD_NOT_FOUND, {"method": method})
            result: dict[str, Any] = {"parameters": handler(params)}
        except VarlinkError as e:
            result = {"error": e.name, "parameters": e.parameters}
        return None if call.get("oneway") else result
