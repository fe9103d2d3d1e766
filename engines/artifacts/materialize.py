"""Make a stored artifact present in one node's model cache.

Layout of a node's ``models_dir``::

    <models_dir>/<name>/<digest>/manifest.json   the artifact's manifest (marks completion)
    <models_dir>/<name>/<digest>/files/...        the files (copied, hardlinked or symlinked)
    <models_dir>/.staging/                        in-flight copies (removed on failure)

A cached copy is reused when its manifest matches and every file has the
recorded size (``verify=True`` re-hashes instead).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from filelock import FileLock

from engines.artifacts.errors import ChecksumMismatch, InvalidSource
from engines.artifacts.staging import (
    CHUNK,
    ProgressCallback,
    StagedFile,
    Staging,
    check_room,
    remove_tree,
    replace_dir_atomically,
    safe_relpath,
    sha256_file,
)
from engines.artifacts.store import ArtifactManifest, ArtifactStore, parse_ref

MaterializeMode = Literal["copy", "hardlink", "symlink"]
MANIFEST_NAME = "manifest.json"


def cached_entry(models_dir: Path, ref: str) -> Path:
    """Where ``ref`` lives (or would live) in a node's model cache."""
    name, digest16 = parse_ref(ref)
    return Path(models_dir) / name / digest16


def local_model_path(entry: Path, manifest: ArtifactManifest) -> Path:
    """The path a loader is given: the single file, or the files directory."""
    files = entry / "files"
    return files / manifest.primary_path if manifest.kind == "file" else files


def _cached_ok(entry: Path, manifest: ArtifactManifest, verify: bool) -> bool:
    marker = entry / MANIFEST_NAME
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if recorded.get("digest") != manifest.digest:
        return False
    for f in manifest.files:
        p = entry / "files" / f.path
        if not p.is_file() or p.stat().st_size != f.size:
            return False
        if verify and sha256_file(p)[0] != f.sha256:
            return False
    return True


def materialize(
    store: ArtifactStore,
    ref: str,
    models_dir: str | Path,
    progress: ProgressCallback | None = None,
    *,
    mode: MaterializeMode = "copy",
    verify: bool = False,
) -> Path:
    """Make artifact ``ref`` present under ``models_dir`` and return its local model path.

    Returns the model file for a single-file artifact and the model directory
    otherwise. Every file is sha256-verified against the manifest as it is
    copied (ChecksumMismatch if the store copy is corrupt); ``mode`` chooses
    copy, hardlink (copy across volumes) or symlink into the store (only
    sensible when the store is a shared filesystem mounted on every node). A
    present, matching copy is reused; ``verify=True`` re-hashes it first.
    Raises ArtifactNotFound for an unknown ref, DiskFull when the node has no
    room; a failed copy leaves nothing behind.
    """
    if mode not in ("copy", "hardlink", "symlink"):
        raise InvalidSource(f"materialize mode {mode!r} is not one of copy, hardlink, symlink")
    manifest = store.get(ref)
    models = Path(models_dir).expanduser()
    models.mkdir(parents=True, exist_ok=True)
    entry = cached_entry(models, ref)
    lock_dir = models / ".locks"
    lock_dir.mkdir(exist_ok=True)
    with FileLock(str(lock_dir / f"{manifest.name}.lock")):
        if _cached_ok(entry, manifest, verify):
            if progress is not None:
                for i, f in enumerate(manifest.files):
                    progress(f.path, f.size, f.size, i)
            return local_model_path(entry, manifest)
        source_dir = store.local_path(ref)
        if mode != "symlink":
            check_room(models, manifest.total_bytes, f"a copy of {ref}")
        with Staging(models / ".staging") as staging:
            for index, f in enumerate(manifest.files):
                got = _stage_one(store, ref, f.path, f.size, source_dir, staging, mode,
                                 progress, index)  # fmt: skip
                if got.sha256 != f.sha256 or got.size != f.size:
                    raise ChecksumMismatch(
                        f"{ref} file {f.path} (the store copy is corrupt: remove the artifact "
                        "and add it again)",
                        f.sha256,
                        got.sha256,
                    )
            (staging.dir / MANIFEST_NAME).write_text(
                json.dumps(manifest.to_dict(), indent=2, sort_keys=True)
            )
            if entry.exists():
                remove_tree(entry)
            if not replace_dir_atomically(staging.dir, entry):
                raise OSError(f"could not move the copy of {ref} into {entry}; retry")
            staging.committed()
    return local_model_path(entry, manifest)


def _stage_one(
    store: ArtifactStore,
    ref: str,
    path: str,
    size: int,
    source_dir: Path | None,
    staging: Staging,
    mode: MaterializeMode,
    progress: ProgressCallback | None,
    index: int,
) -> StagedFile:
    rel = safe_relpath(path)
    if source_dir is not None:
        src = source_dir / rel
        if mode == "copy":
            return staging.copy_file(rel, src, progress=progress, index=index)
        if mode == "hardlink":
            return staging.link_file(rel, src, progress=progress, index=index)
        dest = staging.target(rel)
        os.symlink(src.resolve(), dest)

        def report(done: int) -> None:
            if progress is not None:
                progress(rel, done, size, index)

        sha, got = sha256_file(dest, report)
        return StagedFile(path=rel, sha256=sha, size=got)
    if mode == "symlink":
        raise InvalidSource(
            f"{ref} is not on a filesystem this node can link to; materialize with mode='copy'"
        )
    with store.open_file(ref, rel) as fh:
        return staging.write_stream(
            rel, iter(lambda: fh.read(CHUNK), b""), total=size, progress=progress, index=index
        )
