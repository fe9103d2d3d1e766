"""What can go wrong while storing or materializing an artifact.

Every error says what was wrong and what to do next; all are ``ValueError`` or
``OSError`` subclasses so callers that only care about "it failed" can catch
``ArtifactError``.
"""

from __future__ import annotations


class ArtifactError(Exception):
    """Base of every artifact-store error."""


class UnsafeArtifactPath(ArtifactError, ValueError):
    """A name, ref or file path would escape the store (``..``, absolute, outside symlink)."""


class InvalidSource(ArtifactError, ValueError):
    """A source spec is malformed: the message names the field and the fix."""


class ChecksumMismatch(ArtifactError, ValueError):
    """Downloaded or copied bytes do not have the expected sha256."""

    def __init__(self, what: str, expected: str, actual: str) -> None:
        super().__init__(
            f"sha256 mismatch for {what}: expected {expected}, got {actual}; nothing was stored. "
            "Check the sha256 in the source (or whether the remote file changed) and retry"
        )
        self.expected = expected
        self.actual = actual


class DownloadInterrupted(ArtifactError, OSError):
    """A transfer stopped before the whole body arrived; nothing was kept."""


class DiskFull(ArtifactError, OSError):
    """The target volume ran out of space (ENOSPC) or would not have room; nothing was kept."""


class ArtifactNotFound(ArtifactError, LookupError):
    """No artifact with that ref (or name) is in the store."""


class SourceUnavailable(ArtifactError, OSError):
    """The source could not be reached or read (hub error, offline without a cache, HTTP error)."""
