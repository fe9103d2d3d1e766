"""The artifact store with local and URL sources: manifests, idempotency, refusals, cleanup."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path
from typing import BinaryIO

import pytest

from engines.artifacts import (
    ArtifactNotFound,
    ChecksumMismatch,
    DirectoryArtifactStore,
    DiskFull,
    DownloadInterrupted,
    InvalidSource,
    SourceUnavailable,
    UnsafeArtifactPath,
)
from engines.artifacts import staging as staging_mod
from media.servers import FileServer, store_leftovers


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Progress:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int | None, int]] = []

    def __call__(self, name: str, done: int, total: int | None, index: int) -> None:
        self.calls.append((name, done, total, index))

    def final(self) -> dict[str, tuple[int, int | None, int]]:
        return {name: (done, total, index) for name, done, total, index in self.calls}


def test_local_file_is_copied_with_sha256_and_size(store: DirectoryArtifactStore, tmp_path: Path):
    src = tmp_path / "model.gguf"
    src.write_bytes(b"GGUF" + b"x" * 5000)
    progress = Progress()
    manifest = store.add_from_source("tiny", {"type": "local", "path": str(src)}, progress)

    assert manifest.name == "tiny"
    assert manifest.ref.startswith("tiny@")
    assert manifest.kind == "file"
    assert [f.to_dict() for f in manifest.files] == [
        {"path": "model.gguf", "sha256": sha(src.read_bytes()), "size": 5004}
    ]
    assert manifest.total_bytes == 5004
    assert manifest.source == {"type": "local", "path": str(src)}
    stored = store.file_path(manifest.ref, "model.gguf")
    assert stored.read_bytes() == src.read_bytes()
    assert os.stat(stored).st_ino != os.stat(src).st_ino  # a copy, not a link
    assert progress.final() == {"model.gguf": (5004, 5004, 0)}
    assert store.get(manifest.ref) == manifest


def test_local_directory_is_copied_file_by_file(store: DirectoryArtifactStore, tmp_path: Path):
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"a": 1}')
    (src / "sub" / "weights.bin").write_bytes(b"\x01" * 100)
    (src / "alias.json").symlink_to(src / "config.json")  # link inside the tree: followed
    progress = Progress()
    manifest = store.add_from_source("dir-model", {"type": "local", "path": str(src)}, progress)

    assert manifest.kind == "directory"
    assert [f.path for f in manifest.files] == ["alias.json", "config.json", "sub/weights.bin"]
    assert manifest.total_bytes == 8 + 8 + 100
    root = store.local_path(manifest.ref)
    assert (root / "sub" / "weights.bin").read_bytes() == b"\x01" * 100
    assert not (root / "alias.json").is_symlink()
    assert {name: index for name, (_, _, index) in progress.final().items()} == {
        "alias.json": 0, "config.json": 1, "sub/weights.bin": 2,
    }  # fmt: skip


def test_local_hardlink_shares_the_inode(store: DirectoryArtifactStore, tmp_path: Path):
    src = tmp_path / "m.gguf"
    src.write_bytes(b"abc" * 10)
    manifest = store.add_from_source("linked", {"type": "local", "path": str(src), "link": True})
    assert os.stat(store.file_path(manifest.ref, "m.gguf")).st_ino == os.stat(src).st_ino
    assert manifest.files[0].sha256 == sha(b"abc" * 10)


def test_local_symlink_mode_is_refused_for_the_shared_store(
    store: DirectoryArtifactStore, tmp_path: Path
):
    src = tmp_path / "m.gguf"
    src.write_bytes(b"abc")
    with pytest.raises(InvalidSource, match="hardlink"):
        store.add_from_source("x", {"type": "local", "path": str(src), "link": "symlink"})
    assert store_leftovers(store) == []


def test_readding_identical_content_is_idempotent(store: DirectoryArtifactStore, tmp_path: Path):
    src = tmp_path / "m.gguf"
    src.write_bytes(b"same bytes")
    first = store.add_from_source("m", {"type": "local", "path": str(src)})
    second = store.add_from_source("m", {"type": "local", "path": str(src)})
    assert second == first
    assert [m.ref for m in store.list_artifacts("m")] == [first.ref]

    src.write_bytes(b"other bytes")
    third = store.add_from_source("m", {"type": "local", "path": str(src)})
    assert third.ref != first.ref
    assert {m.ref for m in store.list_artifacts("m")} == {first.ref, third.ref}
    assert list((store.root / "staging").iterdir()) == []


@pytest.mark.parametrize(
    "name", ["..", "../evil", "/abs", "a/b", ".hidden", "", "x" * 200, "a\x00b", "a\\b"]
)
def test_unsafe_names_are_refused_and_nothing_is_stored(
    store: DirectoryArtifactStore, tmp_path: Path, name: str
):
    src = tmp_path / "m.gguf"
    src.write_bytes(b"abc")
    with pytest.raises(UnsafeArtifactPath, match="not allowed"):
        store.add_from_source(name, {"type": "local", "path": str(src)})
    assert store_leftovers(store) == []
    assert not (tmp_path / "evil").exists()


@pytest.mark.parametrize("ref", ["../x@0123456789abcdef", "/etc/passwd", "x@../../..", "x", "x@"])
def test_unsafe_refs_are_refused(store: DirectoryArtifactStore, ref: str):
    with pytest.raises(UnsafeArtifactPath, match="ref"):
        store.get(ref)


def test_file_paths_escaping_an_artifact_are_refused(store: DirectoryArtifactStore, tmp_path: Path):
    src = tmp_path / "m.gguf"
    src.write_bytes(b"abc")
    ref = store.add_from_source("m", {"type": "local", "path": str(src)}).ref
    for bad in ("../manifest.json", "/etc/passwd", "a/../../x"):
        with pytest.raises(UnsafeArtifactPath):
            store.file_path(ref, bad)


def test_symlink_pointing_outside_the_source_dir_is_refused(
    store: DirectoryArtifactStore, tmp_path: Path
):
    secret = tmp_path / "secret.txt"
    secret.write_text("do not copy")
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "leak.txt").symlink_to(secret)
    with pytest.raises(UnsafeArtifactPath, match="outside"):
        store.add_from_source("leaky", {"type": "local", "path": str(src)})
    assert store_leftovers(store) == []


def test_store_entry_symlinked_outside_the_store_is_refused(
    store: DirectoryArtifactStore, tmp_path: Path
):
    outside = tmp_path / "elsewhere" / "0123456789abcdef"
    (outside / "files").mkdir(parents=True)
    (outside / "manifest.json").write_text("{}")
    (store.root / "objects" / "planted").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UnsafeArtifactPath, match="outside"):
        store.get("planted@0123456789abcdef")


def test_tampered_manifest_is_refused(store: DirectoryArtifactStore, tmp_path: Path):
    src = tmp_path / "m.gguf"
    src.write_bytes(b"abc")
    ref = store.add_from_source("m", {"type": "local", "path": str(src)}).ref
    manifest_file = store.local_path(ref).parent / "manifest.json"
    data = json.loads(manifest_file.read_text())
    data["files"][0]["path"] = "../../../etc/passwd"
    manifest_file.write_text(json.dumps(data))
    with pytest.raises(UnsafeArtifactPath):
        store.get(ref)


def test_unknown_ref_names_what_is_stored(store: DirectoryArtifactStore, tmp_path: Path):
    src = tmp_path / "m.gguf"
    src.write_bytes(b"abc")
    ref = store.add_from_source("m", {"type": "local", "path": str(src)}).ref
    with pytest.raises(ArtifactNotFound, match=ref):
        store.get("m@ffffffffffffffff")


def test_bad_source_specs_say_what_to_fix(store: DirectoryArtifactStore, tmp_path: Path):
    with pytest.raises(InvalidSource, match="huggingface, local, url"):
        store.add_from_source("m", {"type": "ftp"})
    with pytest.raises(InvalidSource, match="'path'"):
        store.add_from_source("m", {"type": "local"})
    with pytest.raises(InvalidSource, match="does not exist"):
        store.add_from_source("m", {"type": "local", "path": str(tmp_path / "nope")})
    with pytest.raises(InvalidSource, match="sha256"):
        store.add_from_source("m", {"type": "url", "url": "http://127.0.0.1/x.gguf"})
    with pytest.raises(InvalidSource, match="http"):
        store.add_from_source("m", {"type": "url", "url": "file:///etc/passwd", "sha256": "0" * 64})
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidSource, match="no files"):
        store.add_from_source("m", {"type": "local", "path": str(tmp_path / "empty")})
    assert store_leftovers(store) == []


# --- url -------------------------------------------------------------------------------


def test_url_download_with_matching_sha256(store: DirectoryArtifactStore, file_server: FileServer):
    body = os.urandom(300_000)
    file_server.files["tok.bin"] = body
    progress = Progress()
    source = {"type": "url", "url": f"{file_server.url}/tok.bin?sig=secret", "sha256": sha(body)}
    manifest = store.add_from_source("tok", source, progress)
    assert manifest.files[0].path == "tok.bin"
    assert manifest.files[0].sha256 == sha(body)
    assert store.file_path(manifest.ref, "tok.bin").read_bytes() == body
    # The query string (which may carry a signature or token) is not recorded.
    assert manifest.source["url"] == f"{file_server.url}/tok.bin"
    assert progress.calls[-1] == ("tok.bin", 300_000, 300_000, 0)

    # Pinned by sha256: adding it again does not download again.
    again = store.add_from_source("tok", source)
    assert again == manifest
    assert len(file_server.requests) == 1


def test_url_checksum_mismatch_names_both_digests_and_stores_nothing(
    store: DirectoryArtifactStore, file_server: FileServer
):
    body = b"actual content"
    file_server.files["m.gguf"] = body
    wrong = sha(b"something else")
    with pytest.raises(ChecksumMismatch) as info:
        store.add_from_source(
            "m", {"type": "url", "url": f"{file_server.url}/m.gguf", "sha256": wrong}
        )
    assert wrong in str(info.value) and sha(body) in str(info.value)
    assert "nothing was stored" in str(info.value)
    assert store_leftovers(store) == []


def test_url_interrupted_mid_body_leaves_nothing(
    store: DirectoryArtifactStore, file_server: FileServer
):
    body = os.urandom(200_000)
    file_server.files["m.gguf"] = body
    with pytest.raises(DownloadInterrupted, match=r"stopped after \d+ of 200000 bytes"):
        store.add_from_source(
            "m", {"type": "url", "url": f"{file_server.url}/cut/m.gguf", "sha256": sha(body)}
        )
    assert store_leftovers(store) == []


def test_url_http_error_is_reported(store: DirectoryArtifactStore, file_server: FileServer):
    with pytest.raises(SourceUnavailable, match="HTTP 404"):
        store.add_from_source(
            "m", {"type": "url", "url": f"{file_server.url}/missing.gguf", "sha256": "0" * 64}
        )
    assert store_leftovers(store) == []


def test_full_disk_during_write_leaves_nothing(
    store: DirectoryArtifactStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    src = tmp_path / "m.gguf"
    src.write_bytes(b"z" * (3 * 1024 * 1024))
    calls = {"n": 0}
    real_write_all = staging_mod.write_all

    def write_until_full(fh: BinaryIO, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write_all(fh, data)

    monkeypatch.setattr(staging_mod, "write_all", write_until_full)
    with pytest.raises(DiskFull, match="ran out of space") as info:
        store.add_from_source("m", {"type": "local", "path": str(src)})
    assert info.value.errno == errno.ENOSPC
    assert store_leftovers(store) == []


def test_too_little_free_space_is_refused_up_front(
    store: DirectoryArtifactStore, file_server: FileServer, monkeypatch: pytest.MonkeyPatch
):
    body = b"q" * 1000
    file_server.files["m.gguf"] = body

    class Usage:
        free = 10

    monkeypatch.setattr(staging_mod.shutil, "disk_usage", lambda _path: Usage())
    with pytest.raises(DiskFull, match="not enough space"):
        store.add_from_source("m", {"type": "url", "url": f"{file_server.url}/m.gguf",
                                    "sha256": sha(body)})  # fmt: skip
    assert store_leftovers(store) == []
