"""The wire format between the federated server and its clients: length-prefixed frames, no pickle.

A frame is `u32 header length | header (UTF-8 JSON object, with "type") | u64 body length | body`; bodies
are raw little-endian arrays whose dtype and length the header names. Sizes are bounded so a malformed or
hostile peer gets a clear error instead of an allocation of its choosing.

The server binds loopback only: the transport has no TLS and no client authentication yet, so serving it
beyond this machine is refused (see `check_loopback`).
"""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
from typing import Any

import numpy as np

from lmloom.errors import ConfigError, DataError

MAX_HEADER = 1 << 20
MAX_BODY = 1 << 31


def check_loopback(host: str) -> None:
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError(
            f"host {host!r}: the federated transport has no TLS or client authentication yet; "
            "bind and connect on loopback (127.0.0.1) only"
        )


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise ConnectionError(f"peer closed the connection ({got} of {n} bytes read)")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def send(sock: socket.socket, header: dict[str, Any], body: bytes = b"") -> None:
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    sock.sendall(struct.pack(">I", len(raw)) + raw + struct.pack(">Q", len(body)) + body)


def recv(sock: socket.socket, expect: str | None = None) -> tuple[dict[str, Any], bytes]:
    """One frame: (header, body). `expect` names the message type the caller needs; anything else fails."""
    (n,) = struct.unpack(">I", _recv_exact(sock, 4))
    if n > MAX_HEADER:
        raise DataError(f"frame header of {n} bytes exceeds the {MAX_HEADER}-byte limit")
    try:
        header = json.loads(_recv_exact(sock, n))
    except ValueError as exc:
        raise DataError(f"frame header is not JSON: {exc}") from None
    (m,) = struct.unpack(">Q", _recv_exact(sock, 8))
    if m > MAX_BODY:
        raise DataError(f"frame body of {m} bytes exceeds the {MAX_BODY}-byte limit")
    body = _recv_exact(sock, m)
    if not isinstance(header, dict) or "type" not in header:
        raise DataError("frame header must be a JSON object with a 'type'")
    if header["type"] == "error":
        raise ConnectionError(f"peer reported an error: {header.get('message')}")
    if expect is not None and header["type"] != expect:
        raise DataError(f"expected a {expect!r} message, got {header['type']!r}")
    return header, body


def array_body(array: np.ndarray) -> tuple[dict[str, Any], bytes]:
    array = np.ascontiguousarray(array)
    dtype = array.dtype.newbyteorder("<")
    return {"dtype": dtype.str, "length": int(array.size)}, array.astype(dtype, copy=False).tobytes()


def body_array(header: dict[str, Any], body: bytes, dtype: str) -> np.ndarray:
    """The body as the array the header describes, which must be of `dtype` and length header['length']."""
    if header.get("dtype") != np.dtype(dtype).newbyteorder("<").str:
        raise DataError(f"expected a {dtype} body, the header says {header.get('dtype')!r}")
    array = np.frombuffer(body, dtype=header["dtype"])
    if array.size != header.get("length"):
        raise DataError(f"body holds {array.size} values, the header says {header.get('length')}")
    return array.copy()
