"""Training metrics to the console and to TensorBoard event files, without TensorFlow.

An event file is a TFRecord stream of ``Event`` protocol buffers. Only scalars are written, so the two messages
involved are encoded by hand (field numbers from tensorflow/core/util/event.proto and summary.proto)::

    Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
    Summary { repeated Value value = 1; }
    Value   { string tag = 1; float simple_value = 2; }

TFRecord framing: ``uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)``, little
endian, with the CRC-32C (Castagnoli) checksum masked as ``((crc >> 15 | crc << 17) + 0xa282ead8) mod 2^32``.
TensorBoard reads the files written here (``tensorboard --logdir WORKDIR/tb``).
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path

_CRC_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 two's complement, as protobuf encodes negatives
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _len_field(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int, *, scalars: dict[str, float] | None = None, file_version=None):
    """Serialized ``Event`` with an optional scalar ``Summary`` or a ``file_version``."""
    out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3 | 0) + _varint(step)
    if file_version is not None:
        out += _len_field(3, file_version.encode())
    if scalars:
        values = b"".join(
            _len_field(1, _len_field(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", float(v)))
            for tag, v in scalars.items()
        )
        out += _len_field(5, values)
    return out


def tfrecord(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


def read_tfrecords(path: str | os.PathLike) -> list[bytes]:
    """Records of a TFRecord file, checking both CRCs (used by the tests and for debugging)."""
    raw = Path(path).read_bytes()
    out, i = [], 0
    while i < len(raw):
        header = raw[i : i + 8]
        (n,) = struct.unpack("<Q", header)
        if struct.unpack("<I", raw[i + 8 : i + 12])[0] != masked_crc32c(header):
            raise ValueError(f"{path}: bad length checksum at byte {i}")
        data = raw[i + 12 : i + 12 + n]
        if struct.unpack("<I", raw[i + 12 + n : i + 16 + n])[0] != masked_crc32c(data):
            raise ValueError(f"{path}: bad data checksum at byte {i}")
        out.append(data)
        i += 16 + n
    return out


def _fields(buf: bytes):
    """(field number, wire type, value) of a protobuf message (varint, fixed64, bytes, fixed32 only)."""
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            val, i = _read_varint(buf, i)
        elif wire == 1:
            val, i = buf[i : i + 8], i + 8
        elif wire == 2:
            n, i = _read_varint(buf, i)
            val, i = buf[i : i + n], i + n
        elif wire == 5:
            val, i = buf[i : i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, wire, val


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = out = 0
    while True:
        b = buf[i]
        i += 1
        out |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return out, i


def read_scalars(path: str | os.PathLike) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from an event file written by :class:`EventWriter` (or TensorBoard's simple values)."""
    out: dict[str, dict[int, float]] = {}
    for rec in read_tfrecords(path):
        step, values = 0, []
        for field, _, val in _fields(rec):
            if field == 2:
                step = val
            elif field == 5:
                for f2, _, v in _fields(val):
                    if f2 == 1:
                        tag, x = None, None
                        for f3, _, w in _fields(v):
                            if f3 == 1:
                                tag = w.decode()
                            elif f3 == 2:
                                x = struct.unpack("<f", w)[0]
                        if tag is not None and x is not None:
                            values.append((tag, x))
        for tag, x in values:
            out.setdefault(tag, {})[step] = x
    return out


class EventWriter:
    """Appends scalar summaries to ``logdir/events.out.tfevents.<time>.<host>``; flushes every write."""

    def __init__(self, logdir: str | os.PathLike):
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
        self.path = self.logdir / name
        self._f = open(self.path, "ab")  # noqa: SIM115 - lives as long as the writer
        self._write(encode_event(time.time(), 0, file_version="brain.Event:2"))

    def _write(self, event: bytes) -> None:
        self._f.write(tfrecord(event))
        self._f.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._write(encode_event(time.time(), int(step), scalars=values))

    def close(self) -> None:
        self._f.close()


def format_metrics(step: int, values: dict[str, float]) -> str:
    """One console line: ``step 12 | loss 3.2100 | grad_norm 0.81 | ...``."""
    parts = [f"step {step}"]
    for k, v in values.items():
        parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    return " | ".join(parts)
