"""An independent tf.train.Example and TFRecord writer for the tests, straight from the wire
format (protobuf varints and tags, TFRecord framing with a masked CRC32C), so the code under
test is never checked against itself.

Example  = 1: Features (length-delimited)
Features = 1: map entry {1: key (string), 2: Feature} per feature
Feature  = 1: BytesList | 2: FloatList | 3: Int64List (one of them)
BytesList = 1: bytes per value; FloatList = 1: packed float32; Int64List = 1: packed varints
"""
from __future__ import annotations

import gzip
import struct

import google_crc32c


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 -> two's complement, 10 bytes
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def feature(kind: str, values, packed: bool = True) -> bytes:
    """The bytes of a Feature message holding ``values`` of ``kind``."""
    if kind == "bytes":
        return field(1, b"".join(field(1, v) for v in values))
    if kind == "float":
        if packed:
            body = field(1, struct.pack(f"<{len(values)}f", *values)) if values else b""
        else:  # wire type 5 per value: legal, unusual
            body = b"".join(b"\x0d" + struct.pack("<f", v) for v in values)
        return field(2, body)
    if kind == "int64":
        if packed:
            body = field(1, b"".join(varint(v) for v in values)) if values else b""
        else:  # wire type 0 per value
            body = b"".join(b"\x08" + varint(v) for v in values)
        return field(3, body)
    raise ValueError(kind)


def example(features: dict) -> bytes:
    """``{name: (kind, values)}`` or ``{name: raw Feature bytes}`` -> a serialized Example."""
    entries = []
    for name, spec in features.items():
        body = spec if isinstance(spec, bytes) else feature(*spec)
        entries.append(field(1, field(1, name.encode()) + field(2, body)))
    return field(1, b"".join(entries))


def masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame(record: bytes) -> bytes:
    length = struct.pack("<Q", len(record))
    return (length + struct.pack("<I", masked_crc(length)) + record
            + struct.pack("<I", masked_crc(record)))


def write_tfrecord(path, records, compress: bool = False) -> list[int]:
    """Write ``records`` as a TFRecord file; returns the byte offset of each record."""
    offsets, data, at = [], [], 0
    for r in records:
        offsets.append(at)
        framed = frame(r)
        data.append(framed)
        at += len(framed)
    blob = b"".join(data)
    with open(path, "wb") as f:
        f.write(gzip.compress(blob) if compress else blob)
    return offsets
