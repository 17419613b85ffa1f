"""A small HTTP/1.1 client over a unix socket, with asyncio: what the runtimes' API sockets need
(docker's ``/run/docker.sock``, podman's ``/run/podman/podman.sock``). One request per
connection (``Connection: close``); bodies by Content-Length, chunked, or up to the end."""

from __future__ import annotations

import asyncio

MAX_BODY = 8 << 20
MAX_HEADER = 64 << 10


class HTTPError(Exception):
    """The socket cannot be reached or did not answer HTTP."""


async def request(socket_path: str, method: str, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """(status, body) of *method* *path* on the HTTP server at *socket_path*."""
    try:
        return await asyncio.wait_for(_request(socket_path, method, path), timeout)
    except TimeoutError:
        raise HTTPError(f"{socket_path}: no answer in time") from None
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
        raise HTTPError(f"{socket_path}: {e}") from None


async def _request(socket_path: str, method: str, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_unix_connection(socket_path, limit=MAX_HEADER)
    try:
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
                     f"Content-Length: 0\r\n\r\n".encode("ascii"))  # fmt: skip
        await writer.drain()
        status_line = await reader.readuntil(b"\r\n")
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise ValueError("not an HTTP answer")
        status = int(parts[1])
        headers: dict[str, str] = {}
        while True:
            line = await reader.readuntil(b"\r\n")
            if line == b"\r\n":
                break
            key, _, value = line.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip()
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            return status, b""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = bytearray()
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
                if size == 0:
                    break
                if len(body) + size > MAX_BODY:
                    raise ValueError("answer too large")
                body += await reader.readexactly(size)
                await reader.readexactly(2)
            return status, bytes(body)
        if "content-length" in headers:
            length = int(headers["content-length"])
            if not 0 <= length <= MAX_BODY:
                raise ValueError("answer too large")
            return status, await reader.readexactly(length)
        body_bytes = await reader.read(MAX_BODY + 1)
        if len(body_bytes) > MAX_BODY:
            raise ValueError("answer too large")
        return status, body_bytes
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
