"""Fixtures of the media tests: a store in a temp dir, the SmolLM2 file, HTTP servers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from engines.artifacts import DirectoryArtifactStore
from media.servers import FakeHub, FileServer, serve_fake_hub, serve_files, smollm2_path


@pytest.fixture(scope="session")
def smollm2() -> Path:
    return smollm2_path()


@pytest.fixture
def store(tmp_path: Path) -> DirectoryArtifactStore:
    return DirectoryArtifactStore(tmp_path / "store")


@pytest.fixture
def file_server() -> Iterator[FileServer]:
    with serve_files() as server:
        yield server


@pytest.fixture
def fake_hub() -> Iterator[FakeHub]:
    with serve_fake_hub() as hub:
        yield hub
