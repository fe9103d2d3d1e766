"""Safe names, safe relative paths, and a staging directory that writes while hashing.

Every byte that enters the store (or a node's model cache) is first written
under a private staging directory on the same volume, hashed as it is written,
and only renamed into place by the caller once complete and verified. Any
failure — checksum mismatch, interrupted transfer, full disk, an exception in
a progress callback — removes the staging directory, so nothing half-written
is ever visible.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import BinaryIO

from engines.artifacts.errors import DiskFull, UnsafeArtifactPath

#: ``callback(filename, bytes_done, total_bytes_or_None, file_index)``.
ProgressCallback = Callable[[str, int, int | None, int], None]

CHUNK = 1024 * 1024
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: Space kept free on a volume beyond what a transfer needs.
DISK_MARGIN_BYTES = 64 * 1024 * 1024


def validate_name(name: object) -> str:
    """Return ``name`` if it is a safe artifact name, else raise UnsafeArtifactPath.

    A name is 1 to 128 characters of letters, digits, ``.``, ``_`` and ``-``,
    starting with a letter or digit (so ``..``, ``/x`` and ``a/../b`` are refused).
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise UnsafeArtifactPath(
            f"artifact name {name!r} is not allowed: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no '/', no '..', no absolute paths)"
        )
    return name


def safe_relpath(path: object, what: str = "file path") -> str:
    """Normalize a relative POSIX path inside an artifact, refusing any that could escape it.

    Refuses absolute paths, ``..`` segments, backslashes, NUL bytes and empty
    paths; returns the path with ``.`` segments and duplicate slashes removed.
    """
    if not isinstance(path, str) or not path or "\x00" in path or "\\" in path:
        raise UnsafeArtifactPath(
            f"{what} {path!r} is not allowed: give a non-empty relative path with '/' separators"
        )
    pure = PurePosixPath(path)
    if pure.is_absolute() or re.match(r"^[A-Za-z]:", path):
        raise UnsafeArtifactPath(
            f"{what} {path!r} is absolute; artifacts only hold paths relative to their root"
        )
    parts = [p for p in pure.parts if p not in ("", ".")]
    if not parts or ".." in parts:
        raise UnsafeArtifactPath(
            f"{what} {path!r} climbs out of the artifact with '..'; give a path inside it"
        )
    return "/".join(parts)


def ensure_inside(root: Path, candidate: Path, what: str) -> Path:
    """Resolve ``candidate`` (following symlinks) and refuse it unless it lies under ``root``."""
    real_root = root.resolve()
    real = candidate.resolve()
    if real != real_root and real_root not in real.parents:
        raise UnsafeArtifactPath(
            f"{what} resolves to {real}, outside {real_root}; a symlink or '..' points out of the "
            "store. Remove the link or store the target itself"
        )
    return real


def check_room(directory: Path, needed: int | None, what: str) -> None:
    """Raise DiskFull up front when ``directory``'s volume has no room for ``needed`` bytes."""
    if not needed:
        return
    free = shutil.disk_usage(directory).free
    if free < needed + DISK_MARGIN_BYTES:
        raise DiskFull(
            errno.ENOSPC,
            f"not enough space for {what}: it needs {_mib(needed)} (+{_mib(DISK_MARGIN_BYTES)} "
            f"margin) but {directory} has {_mib(free)} free; free space there or point the "
            "store at a larger volume. Nothing was written",
        )


def _mib(n: int) -> str:
    return f"{n / 1024 / 1024:.1f} MiB"


def disk_full_error(exc: OSError, target: Path, what: str) -> DiskFull:
    """Translate an ENOSPC/EDQUOT OSError into DiskFull naming the volume and the fix."""
    return DiskFull(
        exc.errno or errno.ENOSPC,
        f"the volume holding {target} ran out of space while writing {what} "
        f"({os.strerror(exc.errno or errno.ENOSPC)}); the partial data was removed. "
        "Free space there or point the store at a larger volume, then retry",
    )


@dataclass(frozen=True)
class StagedFile:
    """One file written into a staging directory."""

    path: str
    sha256: str
    size: int


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> tuple[str, int]:
    """Return ``(sha256 hex, size)`` of a file, reporting bytes read to ``progress``."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
            if progress is not None:
                progress(size)
    return digest.hexdigest(), size


class Staging:
    """A private directory on the target volume; removed on exit unless committed.

    Use as a context manager. ``files_dir`` is where content goes; the caller
    renames ``dir`` (or parts of it) into place and then calls ``committed()``.
    """

    def __init__(self, parent: Path) -> None:
        parent.mkdir(parents=True, exist_ok=True)
        self.dir = parent / f"stage-{uuid.uuid4().hex}"
        self.dir.mkdir()
        self.files_dir = self.dir / "files"
        self.files_dir.mkdir()
        self._done = False

    def __enter__(self) -> Staging:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def committed(self) -> None:
        """Mark the staged content as moved into place (nothing left to clean)."""
        self._done = True
        self.cleanup()

    def cleanup(self) -> None:
        if self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)

    def target(self, relpath: str) -> Path:
        rel = safe_relpath(relpath)
        dest = self.files_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        return dest

    def write_stream(
        self,
        relpath: str,
        chunks: Iterable[bytes],
        *,
        total: int | None = None,
        progress: ProgressCallback | None = None,
        index: int = 0,
        display_name: str | None = None,
    ) -> StagedFile:
        """Write ``chunks`` to ``relpath`` while hashing; translate a full disk into DiskFull."""
        dest = self.target(relpath)
        name = display_name or relpath
        digest = hashlib.sha256()
        size = 0
        try:
            with dest.open("xb") as fh:
                for chunk in chunks:
                    if not chunk:
                        continue
                    write_all(fh, chunk)
                    digest.update(chunk)
                    size += len(chunk)
                    if progress is not None:
                        progress(name, size, total, index)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise disk_full_error(exc, dest, name) from None
            raise
        if progress is not None and size == 0:
            progress(name, 0, total, index)
        return StagedFile(path=safe_relpath(relpath), sha256=digest.hexdigest(), size=size)

    def copy_file(
        self,
        relpath: str,
        source: Path,
        *,
        progress: ProgressCallback | None = None,
        index: int = 0,
    ) -> StagedFile:
        """Copy one regular file into the staging directory, hashing as it goes."""
        total = source.stat().st_size
        with source.open("rb") as src:
            return self.write_stream(
                relpath, iter(lambda: src.read(CHUNK), b""), total=total,
                progress=progress, index=index,
            )  # fmt: skip

    def link_file(
        self,
        relpath: str,
        source: Path,
        *,
        progress: ProgressCallback | None = None,
        index: int = 0,
    ) -> StagedFile:
        """Hardlink a file into staging (copy when the volumes differ); hash it either way."""
        dest = self.target(relpath)
        try:
            os.link(source, dest)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
            return self.copy_file(relpath, source, progress=progress, index=index)
        name = safe_relpath(relpath)
        total = dest.stat().st_size

        def report(done: int) -> None:
            if progress is not None:
                progress(name, done, total, index)

        sha, size = sha256_file(dest, report)
        if progress is not None and size == 0:
            progress(name, 0, total, index)
        return StagedFile(path=name, sha256=sha, size=size)


def write_all(fh: BinaryIO, data: bytes) -> None:
    """Write every byte of ``data`` (raising the OSError a short write hides)."""
    view = memoryview(data)
    while view:
        written = fh.write(view)
        if written is None or written <= 0:
            raise OSError(errno.EIO, "short write")
        view = view[written:]


def replace_dir_atomically(src: Path, dest: Path) -> bool:
    """Rename ``src`` to ``dest``; return False (leaving ``src``) if ``dest`` already exists."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(src, dest)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY) or dest.exists():
            return False
        raise
    return True


def remove_tree(path: Path) -> None:
    """Remove a file, link or directory tree if present."""
    if path.is_symlink() or path.is_file():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)
