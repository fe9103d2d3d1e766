"""A fast scan of a GGUF file's header: its keys and the size of every tensor.

``gguf.GGUFReader`` turns every tokenizer entry into numpy views, which takes seconds
for a 50k-token vocabulary; sizing a model needs none of that. This scan walks the
header once over a memory map, keeps scalars, strings and short arrays, and records
only the length of long arrays (vocabularies, merges).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

#: GGUF value types with a fixed size: type id -> struct format.
_FIXED = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
          10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
#: Arrays longer than this keep only their length.
SHORT_ARRAY = 4096


class GgufScanError(ValueError):
    """The bytes are not a well-formed GGUF header."""


@dataclass(frozen=True)
class ScannedTensor:
    name: str
    n_bytes: int


@dataclass
class GgufHeader:
    version: int
    values: dict[str, Any] = field(default_factory=dict)
    array_lengths: dict[str, int] = field(default_factory=dict)
    tensors: list[ScannedTensor] = field(default_factory=list)


class _Cursor:
    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise GgufScanError(f"the header ends early (at byte {self.pos})")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        raw = self.raw_string()
        return raw.decode("utf-8", errors="replace")

    def raw_string(self) -> bytes:
        length = self.take("<Q")
        end = self.pos + length
        if end > len(self.buf):
            raise GgufScanError(f"a string runs past the end of the file (at byte {self.pos})")
        raw = bytes(self.buf[self.pos:end])
        self.pos = end
        return raw

    def skip_strings(self, count: int) -> None:
        end = len(self.buf)
        for _ in range(count):
            if self.pos + 8 > end:
                raise GgufScanError("a string array runs past the end of the file")
            (length,) = struct.unpack_from("<Q", self.buf, self.pos)
            self.pos += 8 + length
        if self.pos > end:
            raise GgufScanError("a string array runs past the end of the file")


def _value(cur: _Cursor, vtype: int, key: str, header: GgufHeader) -> Any:
    if vtype in _FIXED:
        return cur.take(_FIXED[vtype])
    if vtype == _STRING:
        return cur.string()
    if vtype != _ARRAY:
        raise GgufScanError(f"key {key!r} has unknown value type {vtype}")
    item_type = cur.take("<I")
    count = cur.take("<Q")
    header.array_lengths[key] = count
    if item_type == _STRING:
        if count > SHORT_ARRAY:
            cur.skip_strings(count)
            return None
        return [cur.string() for _ in range(count)]
    if item_type not in _FIXED:
        raise GgufScanError(f"key {key!r} is an array of unsupported type {item_type}")
    fmt = _FIXED[item_type]
    size = struct.calcsize(fmt)
    if count > SHORT_ARRAY:
        cur.pos += size * count
        if cur.pos > len(cur.buf):
            raise GgufScanError(f"array {key!r} runs past the end of the file")
        return None
    end = cur.pos + size * count
    if end > len(cur.buf):
        raise GgufScanError(f"array {key!r} runs past the end of the file")
    values = list(struct.unpack_from(f"<{count}{fmt[1]}", cur.buf, cur.pos))
    cur.pos = end
    return values


def scan_gguf(path: str | Path) -> GgufHeader:
    """Keys (long arrays as lengths only) and tensor sizes of a GGUF file (version 2 or 3).

    Raises GgufScanError for anything that is not a well-formed GGUF header.
    """
    with open(path, "rb") as fh:
        try:
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            raise GgufScanError("the file is empty") from None
    with buf:
        cur = _Cursor(buf)
        if cur.take("4s") != b"GGUF":
            raise GgufScanError("it does not start with b'GGUF'")
        header = GgufHeader(version=cur.take("<I"))
        if header.version < 2:
            raise GgufScanError(f"GGUF version {header.version} is too old; re-convert it")
        n_tensors = cur.take("<Q")
        n_kv = cur.take("<Q")
        for _ in range(n_kv):
            key = cur.string()
            value = _value(cur, cur.take("<I"), key, header)
            if value is not None:
                header.values[key] = value
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.take("<I")
            elements = 1
            for _ in range(n_dims):
                elements *= cur.take("<Q")
            ggml_type = cur.take("<I")
            cur.take("<Q")  # offset in the data section
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
            except (ValueError, KeyError):
                raise GgufScanError(f"tensor {name!r} has unknown type {ggml_type}") from None
            header.tensors.append(ScannedTensor(name, elements // block * type_size))
        return header
