"""Read an offline W&B run back: the records of its ``run-<id>.wandb`` file, parsed with W&B's own protobuf schema.

The file is W&B's transaction log in the LevelDB log format (what ``wandb sync`` uploads): a 7-byte header
(``:W&B``, magic ``0xBEE1``, version), then 32 KiB blocks of chunks, each ``crc32 (4, little endian) | length (2) |
type (1) | payload`` with the CRC-32 of type and payload; a record is one FULL chunk or FIRST, MIDDLE..., LAST.
Each record is a ``wandb.proto.wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def record_payloads(path: Path) -> Iterator[bytes]:
    """The serialized records of a ``.wandb`` file, each chunk's CRC checked."""
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1, f"not a W&B log: {path}"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        space = BLOCK - pos % BLOCK
        if space < HEADER:  # the block's zero-filled tail
            pos += space
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        payload = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        assert zlib.crc32(bytes([kind]) + payload) == crc, f"bad chunk checksum at byte {pos} of {path}"
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            yield pending + payload


def _items(items: Any) -> dict[tuple[str, ...], Any]:
    return {(i.key,) if i.key else tuple(i.nested_key): json.loads(i.value_json) for i in items}


def read_run(path: Path) -> tuple[list[dict[tuple[str, ...], Any]], dict[tuple[str, ...], Any]]:
    """``(history rows, summary)`` of the run file ``path``: each row and the summary map a key path (a tuple,
    nested for media such as histograms) to its decoded JSON value."""
    history: list[dict[tuple[str, ...], Any]] = []
    summary: dict[tuple[str, ...], Any] = {}
    for raw in record_payloads(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append(_items(record.history.item))
        elif kind == "summary":
            summary.update(_items(record.summary.update))
    return history, summary
