"""Driver <-> worker messages: a JSON header plus optional raw numeric arrays, length-framed.

Plain data only: nothing received is ever unpickled, so a message from the network can at worst
be malformed, never run code.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

import numpy as np

_FRAME = struct.Struct("!IQ")  # header bytes, payload bytes


class ConnectionClosed(ConnectionError):
    """The peer closed the connection (a worker or the driver exited)."""


def send(sock: socket.socket, header: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> None:
    chunks, meta, offset = [], [], 0
    for name, arr in (arrays or {}).items():
        arr = np.ascontiguousarray(arr)
        meta.append([name, arr.dtype.str, list(arr.shape), offset])
        chunks.append(arr.tobytes())
        offset += arr.nbytes
    if meta:
        header = dict(header, _arrays=meta)
    head = json.dumps(header, separators=(",", ":")).encode()
    sock.sendall(_FRAME.pack(len(head), offset) + head + b"".join(chunks))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionClosed("connection closed")
        got += k
    return bytes(buf)


def recv(sock: socket.socket) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    head_len, payload_len = _FRAME.unpack(_recv_exact(sock, _FRAME.size))
    header = json.loads(_recv_exact(sock, head_len))
    payload = _recv_exact(sock, payload_len) if payload_len else b""
    arrays = {}
    for name, dtype, shape, offset in header.pop("_arrays", []):
        dt = np.dtype(dtype)
        count = int(np.prod(shape)) if shape else 1
        arrays[name] = np.frombuffer(payload, dtype=dt, count=count, offset=offset).reshape(shape)
    return header, arrays


def send_message(sock: socket.socket, msg: Any) -> None:
    """Send a typed message (common.messages: a dataclass with `name` and `encode`)."""
    header, arrays = msg.encode()
    send(sock, dict(header, type=msg.name), arrays)


def recv_message(sock: socket.socket, table: dict[str, type]) -> Any:
    """Receive one typed message whose class `table` names."""
    header, arrays = recv(sock)
    name = header.pop("type", None)
    if name not in table:
        raise ValueError(f"unexpected message {name!r}; expected one of {sorted(table)}")
    return table[name].decode(header, arrays)
