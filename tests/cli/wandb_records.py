"""Decode the records of an offline W&B run file (``run-<id>.wandb``) for tests.

wandb ships no Python reader for these files (wandb-core writes them), and checking that the file
exists, or that some bytes occur in it, says little about what ``wandb sync`` would upload. The file
is a LevelDB-style log (https://github.com/google/leveldb/blob/main/doc/log_format.md): a 7-byte
header (``:W&B``, magic 0xBEE1 as uint16 LE, version 0), then 32 KiB blocks of chunks, each with a
7-byte header (CRC-32 of type byte + data as uint32 LE, length uint16 LE, type uint8). The assembled
payloads are serialized ``wandb_internal_pb2.Record`` messages. Every checksum is verified.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from wandb.proto.wandb_internal_pb2 import Record

IDENT = b":W&B"
MAGIC = 0xBEE1
VERSION = 0
FILE_HEADER = struct.Struct("<4sHB")
CHUNK_HEADER = struct.Struct("<IHB")
BLOCK_SIZE = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class WandbFileError(ValueError):
    """The file is not a well-formed W&B run log."""


def read_payloads(path: str | Path) -> list[bytes]:
    """The raw record payloads of the log at ``path``, in order (chunks reassembled, checksums checked)."""
    data = Path(path).read_bytes()
    if len(data) < FILE_HEADER.size:
        raise WandbFileError(f"{path}: {len(data)} bytes, shorter than the {FILE_HEADER.size}-byte file header")
    ident, magic, version = FILE_HEADER.unpack_from(data)
    if (ident, magic, version) != (IDENT, MAGIC, VERSION):
        raise WandbFileError(f"{path}: bad file header {data[:FILE_HEADER.size]!r} (expected ident {IDENT!r}, "
                             f"magic {MAGIC:#06x}, version {VERSION}; got {ident!r}, {magic:#06x}, {version})")
    payloads: list[bytes] = []
    pending: bytearray | None = None  # the chunks of a record begun by FIRST
    offset = FILE_HEADER.size
    while offset < len(data):
        left_in_block = BLOCK_SIZE - offset % BLOCK_SIZE
        if left_in_block < CHUNK_HEADER.size:  # the block's zero trailer
            if data[offset:offset + left_in_block].strip(b"\0"):
                raise WandbFileError(f"{path}: non-zero block trailer at byte {offset}")
            offset += left_in_block
            continue
        if offset + CHUNK_HEADER.size > len(data):
            raise WandbFileError(f"{path}: truncated chunk header at byte {offset}")
        checksum, length, kind = CHUNK_HEADER.unpack_from(data, offset)
        start = offset + CHUNK_HEADER.size
        if length > left_in_block - CHUNK_HEADER.size or start + length > len(data):
            raise WandbFileError(f"{path}: chunk at byte {offset} of length {length} overruns its block or the file")
        chunk = data[start:start + length]
        expected = zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF
        if checksum != expected:
            raise WandbFileError(f"{path}: checksum mismatch at byte {offset} "
                                 f"(stored {checksum:#010x}, computed {expected:#010x})")
        if kind == FULL and pending is None:
            payloads.append(chunk)
        elif kind == FIRST and pending is None:
            pending = bytearray(chunk)
        elif kind == MIDDLE and pending is not None:
            pending += chunk
        elif kind == LAST and pending is not None:
            payloads.append(bytes(pending + chunk))
            pending = None
        else:
            raise WandbFileError(f"{path}: unexpected chunk type {kind} at byte {offset} "
                                 f"({'inside' if pending is not None else 'outside'} a fragmented record)")
        offset = start + length
    if pending is not None:
        raise WandbFileError(f"{path}: the file ends inside a fragmented record")
    return payloads


def read_records(path: str | Path) -> list[Record]:
    """The ``Record`` protobuf messages of the offline run file at ``path``, in the order written."""
    records = []
    for payload in read_payloads(path):
        record = Record()
        record.ParseFromString(payload)
        records.append(record)
    return records
