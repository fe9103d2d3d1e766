"""The artifact store: named, content-addressed model artifacts shared by every node.

An artifact is a named set of files (one GGUF file, or a model directory)
recorded with a manifest of ``{path, sha256, size}`` per file. Its *ref* is
``"<name>@<digest>"`` where the digest is the first 16 hex digits of a sha256
over the manifest's (path, sha256, size) list, so re-adding identical content
under the same name yields the same ref (idempotent) and different content a
new one (both kept).

:class:`ArtifactStore` is the interface; :class:`DirectoryArtifactStore` is
the implementation on a directory (shared storage in a cluster)::

    <root>/objects/<name>/<digest>/manifest.json
    <root>/objects/<name>/<digest>/files/...
    <root>/staging/            in-flight additions (removed on any failure)
    <root>/hub-cache/          huggingface_hub's cache for this store
    <root>/locks/<name>.lock   one writer per name at a time

An object-store implementation would keep the same manifest and refs and
answer ``open_file`` from the bucket; ``local_path`` would then return None.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from filelock import FileLock

from engines.artifacts.errors import ArtifactNotFound, InvalidSource, UnsafeArtifactPath
from engines.artifacts.hub import stage_huggingface
from engines.artifacts.sources import ArtifactKind, redact_url, stage_local, stage_url
from engines.artifacts.staging import (
    ProgressCallback,
    StagedFile,
    Staging,
    ensure_inside,
    remove_tree,
    replace_dir_atomically,
    safe_relpath,
    validate_name,
)

_REF_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]{0,127})@([0-9a-f]{16})$")
SOURCE_TYPES = ("huggingface", "local", "url")


@dataclass(frozen=True)
class ArtifactFile:
    """One file of an artifact: its path inside the artifact, sha256 and size in bytes."""

    path: str
    sha256: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "size": self.size}


@dataclass(frozen=True)
class ArtifactManifest:
    """What an artifact-stored event records: name, ref, kind, files, total bytes, source.

    ``source`` is the spec it came from with secrets removed (no ``token``, no
    URL credentials or query) plus resolved facts (e.g. the hub ``commit``).
    ``kind`` is ``"file"`` when the artifact is one model file (its local path
    is that file) and ``"directory"`` otherwise.
    """

    name: str
    ref: str
    kind: ArtifactKind
    files: tuple[ArtifactFile, ...]
    total_bytes: int
    source: dict[str, Any]
    digest: str
    created_at: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def primary_path(self) -> str:
        """The path (inside the artifact) a loader should be given: the file, or the root."""
        return self.files[0].path if self.kind == "file" else ""

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready payload (also the on-disk manifest.json)."""
        return {
            "name": self.name,
            "ref": self.ref,
            "kind": self.kind,
            "files": [f.to_dict() for f in self.files],
            "total_bytes": self.total_bytes,
            "source": self.source,
            "digest": self.digest,
            "created_at": self.created_at,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArtifactManifest:
        """Rebuild a manifest from ``to_dict()`` output, re-checking every path and the ref."""
        files = tuple(
            ArtifactFile(
                path=safe_relpath(f["path"], "manifest file path"),
                sha256=str(f["sha256"]),
                size=int(f["size"]),
            )
            for f in data["files"]
        )
        name = validate_name(data["name"])
        digest = str(data["digest"])
        if content_digest(files) != digest or data["ref"] != f"{name}@{digest[:16]}":
            raise UnsafeArtifactPath(
                f"manifest of {data.get('ref')!r} does not match its files; the store entry was "
                "altered: remove it and add the artifact again"
            )
        return cls(
            name=name,
            ref=str(data["ref"]),
            kind=data["kind"],
            files=files,
            total_bytes=int(data["total_bytes"]),
            source=dict(data.get("source") or {}),
            digest=digest,
            created_at=str(data.get("created_at", "")),
        )


def content_digest(files: Sequence[ArtifactFile | StagedFile]) -> str:
    """sha256 over the sorted ``path\\0sha256\\0size`` lines of a file list."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda item: item.path):
        h.update(f"{f.path}\0{f.sha256}\0{f.size}\n".encode())
    return h.hexdigest()


def parse_ref(ref: object) -> tuple[str, str]:
    """Split ``"<name>@<16 hex>"`` into (name, digest16), refusing anything else."""
    if not isinstance(ref, str) or not (m := _REF_RE.fullmatch(ref)):
        raise UnsafeArtifactPath(
            f"artifact ref {ref!r} is not valid; refs look like 'name@0123456789abcdef' "
            "(as returned by add_from_source)"
        )
    return m.group(1), m.group(2)


def public_source(source: dict[str, Any]) -> dict[str, Any]:
    """The source spec without secrets, safe to record in an event."""
    clean = {k: v for k, v in source.items() if k not in ("token", "headers", "password")}
    if isinstance(clean.get("url"), str):
        clean["url"] = redact_url(clean["url"])
    if "token" in source:
        clean["token_used"] = bool(source["token"])
    return clean


class ArtifactStore(ABC):
    """Where model artifacts live, shared by every node of a cluster."""

    @abstractmethod
    def add_from_source(
        self, name: str, source: dict[str, Any], progress: ProgressCallback | None = None
    ) -> ArtifactManifest:
        """Materialize ``source`` under ``name`` and return its manifest.

        ``source`` is one of ``{"type": "huggingface", "repo", "revision"?,
        "filename"? | "allow_patterns"?, "ignore_patterns"?, "snapshot"?,
        "token"?, "offline"?}``, ``{"type": "local", "path", "link"?}`` or
        ``{"type": "url", "url", "sha256", "filename"?}``. ``progress`` is
        called as ``progress(filename, bytes_done, total_or_None, file_index)``.
        Nothing becomes visible unless every file is complete and verified.
        """

    @abstractmethod
    def get(self, ref: str) -> ArtifactManifest:
        """The manifest of ``ref``; ArtifactNotFound if absent, UnsafeArtifactPath if malformed."""

    @abstractmethod
    def list_artifacts(self, name: str | None = None) -> list[ArtifactManifest]:
        """Every stored artifact (of ``name`` if given), oldest first."""

    @abstractmethod
    def open_file(self, ref: str, path: str) -> BinaryIO:
        """Open one file of an artifact for reading (binary)."""

    @abstractmethod
    def remove(self, ref: str) -> None:
        """Delete an artifact; ArtifactNotFound if absent."""

    def local_path(self, ref: str) -> Path | None:
        """A directory holding the artifact's files on this node's filesystem, if there is one."""
        return None


class DirectoryArtifactStore(ArtifactStore):
    """An artifact store on a directory (local disk, or NFS/shared storage in a cluster)."""

    def __init__(
        self,
        root: str | Path,
        *,
        hf_endpoint: str | None = None,
        offline: bool | None = None,
    ) -> None:
        """``hf_endpoint``/``offline`` override ``HF_ENDPOINT``/``HF_HUB_OFFLINE`` for the hub."""
        self.root = Path(root).expanduser().resolve()
        self.hf_endpoint = hf_endpoint
        self.offline = offline
        for sub in ("objects", "staging", "locks", "hub-cache"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_settings(cls, settings: Any | None = None) -> DirectoryArtifactStore:
        """The store at ``Settings.artifact_store_path`` (``ROUNDHOUSE_ARTIFACT_STORE``)."""
        from events.settings import Settings

        s = settings or Settings.from_env()
        return cls(s.artifact_store_path)

    @property
    def hub_cache(self) -> Path:
        """huggingface_hub's cache directory for this store."""
        return self.root / "hub-cache"

    # --- paths -------------------------------------------------------------------
    def _entry_dir(self, ref: str) -> Path:
        name, digest16 = parse_ref(ref)
        entry = self.root / "objects" / name / digest16
        if entry.exists() or entry.is_symlink():
            ensure_inside(self.root / "objects", entry, f"artifact {ref}")
        return entry

    def local_path(self, ref: str) -> Path:
        """The directory holding the files of ``ref``; ArtifactNotFound if absent."""
        self.get(ref)
        return self._entry_dir(ref) / "files"

    def file_path(self, ref: str, path: str) -> Path:
        """The on-disk path of one file of ``ref``, refusing paths or links leaving the artifact."""
        files = self.local_path(ref)
        target = files / safe_relpath(path)
        return ensure_inside(files, target, f"file {path!r} of {ref}")

    # --- reads -------------------------------------------------------------------
    def get(self, ref: str) -> ArtifactManifest:
        entry = self._entry_dir(ref)
        manifest_file = entry / "manifest.json"
        if not manifest_file.is_file():
            name, _ = parse_ref(ref)
            stored = (self.root / "objects" / name).is_dir()
            known = [m.ref for m in self.list_artifacts(name)] if stored else []
            hint = f"; stored refs of {name!r}: {', '.join(known)}" if known else ""
            raise ArtifactNotFound(
                f"artifact {ref} is not in the store {self.root}{hint}; add it with "
                "add_from_source first"
            )
        try:
            manifest = ArtifactManifest.from_dict(json.loads(manifest_file.read_text()))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, UnsafeArtifactPath):
                raise
            raise UnsafeArtifactPath(
                f"manifest of {ref} is unreadable ({exc}); remove {entry} and add it again"
            ) from None
        if manifest.ref != ref:
            raise UnsafeArtifactPath(f"manifest at {entry} names {manifest.ref}, not {ref}")
        return manifest

    def list_artifacts(self, name: str | None = None) -> list[ArtifactManifest]:
        objects = self.root / "objects"
        names = [validate_name(name)] if name is not None else sorted(
            p.name for p in objects.iterdir() if p.is_dir()
        )  # fmt: skip
        found = []
        for n in names:
            d = objects / n
            if not d.is_dir():
                continue
            for entry in d.iterdir():
                if (entry / "manifest.json").is_file():
                    try:
                        found.append(self.get(f"{n}@{entry.name}"))
                    except (UnsafeArtifactPath, ArtifactNotFound):
                        continue
        return sorted(found, key=lambda m: (m.created_at, m.ref))

    def open_file(self, ref: str, path: str) -> BinaryIO:
        manifest = self.get(ref)
        rel = safe_relpath(path)
        if rel not in {f.path for f in manifest.files}:
            raise ArtifactNotFound(f"{ref} has no file {rel!r}; its files: "
                                   + ", ".join(f.path for f in manifest.files))
        return self.file_path(ref, rel).open("rb")

    def remove(self, ref: str) -> None:
        self.get(ref)
        name, _ = parse_ref(ref)
        with FileLock(str(self.root / "locks" / f"{name}.lock")):
            remove_tree(self._entry_dir(ref))

    # --- writes ------------------------------------------------------------------
    def add_from_source(
        self, name: str, source: dict[str, Any], progress: ProgressCallback | None = None
    ) -> ArtifactManifest:
        validate_name(name)
        if not isinstance(source, dict):
            raise InvalidSource(
                f"source must be a JSON object with a 'type' ({', '.join(SOURCE_TYPES)}), "
                f"got {type(source).__name__}"
            )
        kind_of_source = source.get("type")
        if kind_of_source not in SOURCE_TYPES:
            raise InvalidSource(
                f"source type {kind_of_source!r} is not supported; use one of "
                + ", ".join(SOURCE_TYPES)
            )
        if kind_of_source == "url":
            pinned = self._existing_url_artifact(name, source)
            if pinned is not None:
                return pinned
        facts: dict[str, Any] = {}
        with Staging(self.root / "staging") as staging:
            if kind_of_source == "local":
                staged, kind = stage_local(source, staging, progress)
            elif kind_of_source == "url":
                staged, kind = stage_url(source, staging, progress)
            else:
                staged, kind, facts = stage_huggingface(
                    source, staging, progress, cache_dir=self.hub_cache,
                    endpoint=self.hf_endpoint, offline=bool(self.offline),
                )  # fmt: skip
            return self._commit(name, staging, staged, kind, {**public_source(source), **facts})

    def _existing_url_artifact(self, name: str, source: dict[str, Any]) -> ArtifactManifest | None:
        """A url artifact already stored under ``name`` with the same pinned sha256, if any."""
        sha = str(source.get("sha256", "")).lower()
        if not sha or not (self.root / "objects" / name).is_dir():
            return None
        for manifest in self.list_artifacts(name):
            if (
                manifest.source.get("type") == "url"
                and len(manifest.files) == 1
                and manifest.files[0].sha256 == sha
                and manifest.source.get("url") == redact_url(str(source.get("url", "")))
            ):
                return manifest
        return None

    def _commit(
        self,
        name: str,
        staging: Staging,
        staged: list[StagedFile],
        kind: ArtifactKind,
        source: dict[str, Any],
    ) -> ArtifactManifest:
        files = tuple(ArtifactFile(f.path, f.sha256, f.size) for f in staged)
        digest = content_digest(files)
        ref = f"{name}@{digest[:16]}"
        manifest = ArtifactManifest(
            name=name,
            ref=ref,
            kind=kind,
            files=tuple(sorted(files, key=lambda f: f.path)) if kind == "directory" else files,
            total_bytes=sum(f.size for f in files),
            source=source,
            digest=digest,
            created_at=datetime.now(UTC).isoformat(),
        )
        tmp_manifest = staging.dir / "manifest.json"
        tmp_manifest.write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=True))
        with open(tmp_manifest, "rb") as fh:
            os.fsync(fh.fileno())
        entry = self.root / "objects" / name / digest[:16]
        with FileLock(str(self.root / "locks" / f"{name}.lock")):
            if (entry / "manifest.json").is_file():
                return self.get(ref)  # identical content already stored: idempotent
            if entry.exists():
                remove_tree(entry)  # a leftover without a manifest is not an artifact
            if not replace_dir_atomically(staging.dir, entry):
                return self.get(ref)
            staging.committed()
        return manifest
