"""Errors of the side-effecting half of providers: install, readiness, launch.

Every message says what was wrong and what to do next, so node agents can
store it as a failure summary unchanged.
"""

from __future__ import annotations


class ProvisionError(RuntimeError):
    """Base class: installing, checking or launching an engine failed."""


class PolicyRefused(ProvisionError):
    """A plan needs a source the node's settings do not allow; the message names the setting."""

    def __init__(self, message: str, setting: str) -> None:
        super().__init__(message)
        self.setting = setting


class InstallError(ProvisionError):
    """An install step failed; the message carries the step and the tail of its output."""


class ChecksumMismatch(InstallError):
    """A download's sha256 is not the pinned one; the download has been deleted."""

    def __init__(self, url: str, expected: str, actual: str) -> None:
        super().__init__(
            f"checksum mismatch for {url}: expected sha256 {expected}, got {actual}; "
            "the download was deleted. Check binary_url and binary_sha256 in the engine config."
        )
        self.expected = expected
        self.actual = actual


class ContainerRuntimeMissing(InstallError):
    """Neither podman nor docker is usable on this node."""


class GpuUnavailable(ProvisionError):
    """A GPU was requested on a node without one and CPU fallback is not allowed."""


class NotInstalled(ProvisionError):
    """The engine is not installed for this config on this node; the message says how to install."""


class NotLaunchable(ProvisionError):
    """The provider runs no local process (e.g. a remote endpoint)."""


class EngineStartFailed(ProvisionError):
    """The engine process exited or never became ready; the message carries its log tail."""


class ReadinessTimeout(EngineStartFailed):
    """The engine did not answer its health endpoint in time."""
