"""Driver <-> worker messages: a JSON header plus optional raw numeric arrays, length-framed.

Plain data only: nothing received is ever unpickled, so a message from the network can at worst
be malformed, never run code. Lengths are checked before anything is allocated: a header over
`MAX_HEADER_BYTES`, or a payload over the limit the receiver passes, raises `FrameTooLarge`.

Two ways to receive: `recv` blocks on the socket (the worker, which has one peer and nothing else
to do), `FrameReader` takes what a non-blocking socket has and returns each frame once it is whole
(the driver, which watches every worker and a deadline at once).
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

import numpy as np

_FRAME = struct.Struct("!IQ")  # header bytes, payload bytes
MAX_HEADER_BYTES = 64 << 20
"""the largest JSON header any receiver accepts (a step plan, the largest we send, holds one step's tokens
and its sequences' block tables: a few MB at most)"""


class ConnectionClosed(ConnectionError):
    """The peer closed the connection (a worker or the driver exited)."""


class FrameTooLarge(ValueError):
    """A frame announced more bytes than the receiver accepts (a corrupt stream, or not our peer)."""


def encode(header: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> bytes:
    """One whole frame: lengths, JSON header (listing the arrays), the arrays' bytes."""
    chunks, meta, offset = [], [], 0
    for name, arr in (arrays or {}).items():
        arr = np.ascontiguousarray(arr)
        meta.append([name, arr.dtype.str, list(arr.shape), offset])
        chunks.append(arr.tobytes())
        offset += arr.nbytes
    if meta:
        header = dict(header, _arrays=meta)
    head = json.dumps(header, separators=(",", ":")).encode()
    return _FRAME.pack(len(head), offset) + head + b"".join(chunks)


def encode_message(msg: Any) -> bytes:
    """The frame of a typed message (common.messages: a dataclass with `name` and `encode`)."""
    header, arrays = msg.encode()
    return encode(dict(header, type=msg.name), arrays)


def send(sock: socket.socket, header: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> None:
    sock.sendall(encode(header, arrays))


def send_message(sock: socket.socket, msg: Any) -> None:
    """Send a typed message (common.messages: a dataclass with `name` and `encode`)."""
    sock.sendall(encode_message(msg))


def _lengths(prefix: bytes, max_header: int, max_payload: int | None) -> tuple[int, int]:
    head_len, payload_len = _FRAME.unpack(prefix)
    if head_len > max_header:
        raise FrameTooLarge(f"frame header of {head_len} bytes exceeds the limit of {max_header} bytes")
    if max_payload is not None and payload_len > max_payload:
        raise FrameTooLarge(f"frame payload of {payload_len} bytes exceeds the limit of {max_payload} bytes")
    return head_len, payload_len


def _decode(head: bytes | memoryview, payload: bytes | memoryview) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    header = json.loads(bytes(head))
    if not isinstance(header, dict):
        raise ValueError(f"frame header is a JSON {type(header).__name__}, not an object")
    arrays = {}
    try:
        for name, dtype, shape, offset in header.pop("_arrays", []):
            count = int(np.prod(shape)) if shape else 1
            arrays[name] = np.frombuffer(payload, dtype=np.dtype(dtype), count=count, offset=offset).reshape(shape)
    except (TypeError, ValueError) as exc:  # not a list of [name, dtype, shape, offset] that fits the payload
        raise ValueError(f"frame header lists arrays its payload does not hold: {exc}") from None
    return header, arrays


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionClosed("connection closed")
        got += k
    return bytes(buf)


def recv(sock: socket.socket, max_header: int = MAX_HEADER_BYTES,
         max_payload: int | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One frame from a blocking socket; FrameTooLarge before allocating anything over the limits."""
    head_len, payload_len = _lengths(_recv_exact(sock, _FRAME.size), max_header, max_payload)
    head = _recv_exact(sock, head_len)
    return _decode(head, _recv_exact(sock, payload_len) if payload_len else b"")


def recv_message(sock: socket.socket, table: dict[str, type]) -> Any:
    """Receive one typed message whose class `table` names."""
    header, arrays = recv(sock)
    name = header.pop("type", None)
    if name not in table:
        raise ValueError(f"unexpected message {name!r}; expected one of {sorted(table)}")
    return table[name].decode(header, arrays)


class FrameReader:
    """Frames from a non-blocking socket, assembled across reads; never blocks."""

    def __init__(self, sock: socket.socket, max_header: int = MAX_HEADER_BYTES, max_payload: int | None = None):
        self.sock, self.max_header, self.max_payload = sock, max_header, max_payload
        self._prefix = bytearray()
        self._body: bytearray | None = None  # header + payload of the frame being read, once its lengths are known
        self._head_len = self._got = 0
        self._error: Exception | None = None  # raised by the next read, after the frames before it

    def read(self) -> list[tuple[dict[str, Any], dict[str, np.ndarray]]]:
        """Every frame completed by what the socket has now (maybe none). Raises ConnectionClosed at the
        end of the stream, FrameTooLarge or ValueError for a frame that is not ours; frames completed
        before either come out first (the error is raised by the next call)."""
        if self._error is not None:
            raise self._error
        frames: list[tuple[dict[str, Any], dict[str, np.ndarray]]] = []
        try:
            while self._read_some():
                if self._body is not None and self._got == len(self._body):
                    body = memoryview(self._body)
                    frames.append(_decode(body[:self._head_len], body[self._head_len:]))
                    self._prefix, self._body = bytearray(), None
        except (OSError, ValueError) as exc:
            if not frames:
                raise
            self._error = exc
        return frames

    def _read_some(self) -> bool:
        """One non-blocking read towards the current frame; False when the socket has nothing now."""
        try:
            if self._body is None:
                chunk = self.sock.recv(_FRAME.size - len(self._prefix))
                if not chunk:
                    raise ConnectionClosed("connection closed")
                self._prefix += chunk
                if len(self._prefix) == _FRAME.size:
                    self._head_len, payload_len = _lengths(bytes(self._prefix), self.max_header, self.max_payload)
                    self._body, self._got = bytearray(self._head_len + payload_len), 0
            elif self._got < len(self._body):
                k = self.sock.recv_into(memoryview(self._body)[self._got:])
                if k == 0:
                    raise ConnectionClosed("connection closed")
                self._got += k
        except BlockingIOError:
            return False
        return True
