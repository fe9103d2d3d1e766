"""Model artifacts: the shared store, its sources, and per-node materialization.

``DirectoryArtifactStore(root).add_from_source(name, source, progress)`` stores
a Hugging Face repo file/snapshot, a local file/directory or a URL with a pinned
sha256 and returns an :class:`ArtifactManifest` (name, ref, files with sha256
and size, total bytes, source). ``materialize(store, ref, models_dir)`` makes
it present in a node's model cache.
"""

from engines.artifacts.errors import (
    ArtifactError,
    ArtifactNotFound,
    ChecksumMismatch,
    DiskFull,
    DownloadInterrupted,
    InvalidSource,
    SourceUnavailable,
    UnsafeArtifactPath,
)
from engines.artifacts.materialize import MaterializeMode, cached_entry, materialize
from engines.artifacts.staging import ProgressCallback
from engines.artifacts.store import (
    ArtifactFile,
    ArtifactManifest,
    ArtifactStore,
    DirectoryArtifactStore,
    parse_ref,
)

__all__ = [
    "ArtifactError",
    "ArtifactFile",
    "ArtifactManifest",
    "ArtifactNotFound",
    "ArtifactStore",
    "ChecksumMismatch",
    "DirectoryArtifactStore",
    "DiskFull",
    "DownloadInterrupted",
    "InvalidSource",
    "MaterializeMode",
    "ProgressCallback",
    "SourceUnavailable",
    "UnsafeArtifactPath",
    "cached_entry",
    "materialize",
    "parse_ref",
]
