"""The fast GGUF header scan agrees with the gguf package's full reader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import pytest

from engines.gguf_scan import GgufScanError, scan_gguf

from .model_files import write_tiny_gguf
from .servers import smollm2_path


def _reader_values(reader: Any) -> dict[str, Any]:
    values = {}
    for key, fld in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = fld.contents()
        values[key] = value.decode() if isinstance(value, bytes) else value
    return values


@pytest.mark.parametrize("make", ["smollm2", "tiny", "tiny-per-layer-kv"])
def test_scan_matches_the_full_reader(make: str, tmp_path: Path) -> None:
    if make == "smollm2":
        path = smollm2_path()
    else:
        kv = [1, 2, 2] if make == "tiny-per-layer-kv" else 2
        path = write_tiny_gguf(tmp_path / "t.gguf", n_layers=3, n_kv_heads=kv, vocab=5000)
    reader = gguf.GGUFReader(path)
    header = scan_gguf(path)
    expected = _reader_values(reader)
    for key, value in expected.items():
        if key in header.values:
            got = header.values[key]
            assert got == pytest.approx(value) if isinstance(value, float) else got == value, key
        else:  # long arrays keep only their length
            assert header.array_lengths[key] == len(reader.fields[key].data), key
    assert set(header.values) | set(header.array_lengths) >= set(expected)
    assert [(t.name, t.n_bytes) for t in header.tensors] == [
        (t.name, int(t.n_bytes)) for t in reader.tensors]


@pytest.mark.parametrize("body", [b"", b"GGUF", b"GGML" + b"\0" * 20,
                                  b"GGUF\x03\0\0\0" + b"\xff" * 16])
def test_malformed_headers_are_refused(body: bytes, tmp_path: Path) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(body)
    with pytest.raises(GgufScanError):
        scan_gguf(path)


def test_a_truncated_file_is_refused(tmp_path: Path) -> None:
    whole = smollm2_path().read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(whole[:200_000])  # inside the tokenizer arrays
    with pytest.raises(GgufScanError, match=r"past the end|ends early"):
        scan_gguf(path)
