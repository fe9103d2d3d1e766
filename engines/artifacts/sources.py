"""The ``local`` and ``url`` sources: copy/link from a path, or download with a pinned sha256.

Each ``stage_*`` function writes into a :class:`Staging` directory and returns
the staged files plus the artifact kind; it never touches the store's final
locations. The Hugging Face source lives in :mod:`engines.artifacts.hub`.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit, urlunsplit

import httpx

from engines.artifacts.errors import (
    ChecksumMismatch,
    DownloadInterrupted,
    InvalidSource,
    SourceUnavailable,
    UnsafeArtifactPath,
)
from engines.artifacts.staging import (
    CHUNK,
    ProgressCallback,
    StagedFile,
    Staging,
    check_room,
    safe_relpath,
)

ArtifactKind = Literal["file", "directory"]
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_FILENAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,200}$")


# --- local ---------------------------------------------------------------------------


def _link_mode(spec: dict[str, Any]) -> bool:
    link = spec.get("link", False)
    if link in (False, None, "copy"):
        return False
    if link in (True, "hardlink"):
        return True
    if link == "symlink":
        raise InvalidSource(
            "local source link='symlink' is refused: a symlink out of the shared artifact store "
            "would dangle on every other node. Use link='hardlink' (same volume) or copy"
        )
    raise InvalidSource(
        f"local source link={link!r} is not understood; use true/'hardlink' or false"
    )


def list_local_files(root: Path) -> list[tuple[str, Path]]:
    """List ``(relative path, real file)`` for every file under a directory.

    File symlinks whose target stays inside ``root`` are followed; a symlink
    pointing outside ``root``, a directory symlink, or a special file (socket,
    FIFO, device) is refused with UnsafeArtifactPath / InvalidSource.
    """
    real_root = root.resolve()
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        for d in list(dirnames):
            if (here / d).is_symlink():
                raise UnsafeArtifactPath(
                    f"{here / d} is a directory symlink; store its target directory itself"
                )
        for f in sorted(filenames):
            p = here / f
            rel = p.relative_to(root).as_posix()
            real = p.resolve()
            if real != real_root and real_root not in real.parents:
                raise UnsafeArtifactPath(
                    f"{p} is a symlink to {real}, outside {real_root}; copy the target into the "
                    "directory or store it as its own artifact"
                )
            mode = os.stat(real).st_mode
            if not stat.S_ISREG(mode):
                raise InvalidSource(f"{p} is not a regular file; remove it from the directory")
            found.append((safe_relpath(rel), real))
    found.sort(key=lambda item: item[0])
    return found


def stage_local(
    spec: dict[str, Any], staging: Staging, progress: ProgressCallback | None
) -> tuple[list[StagedFile], ArtifactKind]:
    """Copy (or hardlink, with ``link: true``) a local file or directory into staging."""
    raw = spec.get("path")
    if not isinstance(raw, str) or not raw:
        raise InvalidSource("local source needs 'path': the file or directory to store")
    link = _link_mode(spec)
    src = Path(raw).expanduser()
    if not src.exists():
        raise InvalidSource(f"local source path {src} does not exist; check the path")
    if src.is_file():
        items = [(safe_relpath(src.name), src.resolve())]
        kind: ArtifactKind = "file"
    elif src.is_dir():
        items = list_local_files(src)
        if not items:
            raise InvalidSource(f"local source directory {src} holds no files; nothing to store")
        kind = "directory"
    else:
        raise InvalidSource(f"local source path {src} is neither a file nor a directory")
    if not link:
        check_room(staging.dir, sum(p.stat().st_size for _, p in items), f"a copy of {src}")
    staged = []
    for index, (rel, real) in enumerate(items):
        if link:
            staged.append(staging.link_file(rel, real, progress=progress, index=index))
        else:
            staged.append(staging.copy_file(rel, real, progress=progress, index=index))
    return staged, kind


# --- url -----------------------------------------------------------------------------


def validate_url_spec(spec: dict[str, Any]) -> tuple[str, str, str]:
    """Return ``(url, sha256, filename)`` of a url source, or raise InvalidSource."""
    url = spec.get("url")
    if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https"):
        raise InvalidSource(f"url source needs 'url' with an http(s) address, got {url!r}")
    sha = spec.get("sha256")
    if not isinstance(sha, str) or not _SHA256_RE.fullmatch(sha.lower()):
        raise InvalidSource(
            "url source needs 'sha256': the 64-hex-digit sha256 of the file (downloads without "
            "a pinned checksum are refused)"
        )
    filename = spec.get("filename") or unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    if not isinstance(filename, str) or not _FILENAME_RE.fullmatch(filename):
        raise InvalidSource(
            f"cannot use {filename!r} as the file name of {redact_url(url)}; pass 'filename' "
            "(letters, digits, '.', '_', '-', '+')"
        )
    return url, sha.lower(), filename


def redact_url(url: str) -> str:
    """The URL without user:password and without its query string (which may carry tokens)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def stage_url(
    spec: dict[str, Any],
    staging: Staging,
    progress: ProgressCallback | None,
    *,
    timeout_s: float = 60.0,
) -> tuple[list[StagedFile], ArtifactKind]:
    """Download a URL with httpx streaming and verify its pinned sha256."""
    url, expected, filename = validate_url_spec(spec)
    shown = redact_url(url)
    received = 0
    total: int | None = None

    def body(response: httpx.Response) -> Iterator[bytes]:
        nonlocal received
        try:
            for chunk in response.iter_bytes(CHUNK):
                received += len(chunk)
                yield chunk
        except httpx.TransportError as exc:
            of = f" of {total}" if total is not None else ""
            raise DownloadInterrupted(
                f"download of {shown} stopped after {received}{of} bytes "
                f"({type(exc).__name__}: {exc}); nothing was stored. Retry, or check the server"
            ) from None

    try:
        with (
            httpx.Client(follow_redirects=True, timeout=timeout_s) as client,
            client.stream("GET", url) as response,
        ):
            if response.status_code >= 400:
                raise SourceUnavailable(
                    f"GET {shown} answered HTTP {response.status_code}; check the URL "
                    "(and any credentials it needs)"
                )
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            check_room(staging.dir, total, shown)
            staged = staging.write_stream(
                filename, body(response), total=total, progress=progress, index=0
            )
    except httpx.TransportError as exc:
        raise SourceUnavailable(
            f"could not download {shown} ({type(exc).__name__}: {exc}); check the address and "
            "that the server is reachable from this node"
        ) from None
    if total is not None and staged.size != total:
        raise DownloadInterrupted(
            f"download of {shown} ended after {staged.size} of {total} bytes; nothing was "
            "stored. Retry"
        )
    if staged.sha256 != expected:
        raise ChecksumMismatch(shown, expected, staged.sha256)
    return [staged], "file"
