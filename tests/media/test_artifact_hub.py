"""The huggingface source through the real huggingface_hub client against a fake hub server."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from engines.artifacts import (
    ChecksumMismatch,
    DirectoryArtifactStore,
    InvalidSource,
    SourceUnavailable,
)
from media.servers import FakeHub, FakeRepo, store_leftovers

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def repo(fake_hub: FakeHub) -> FakeRepo:
    r = FakeRepo(
        files={
            "config.json": json.dumps({"model_type": "llama"}).encode(),
            "tokenizer.json": b'{"version": "1.0"}' * 50,
            "model.safetensors": b"\x00" * 70_000,
            "model-q4.gguf": b"GGUF" + b"\x07" * 40_000,
            "README.md": b"# tiny\n",
        },
        lfs={"model.safetensors", "model-q4.gguf"},
        commit=COMMIT,
        branches=("main", "v1"),
    )
    fake_hub.repos["acme/tiny"] = r
    return r


@pytest.fixture
def hub_store(tmp_path: Path, fake_hub: FakeHub) -> DirectoryArtifactStore:
    return DirectoryArtifactStore(tmp_path / "store", hf_endpoint=fake_hub.endpoint)


def test_snapshot_downloads_through_huggingface_hub_with_progress(
    hub_store: DirectoryArtifactStore, fake_hub: FakeHub, repo: FakeRepo
):
    calls: list[tuple[str, int, int | None, int]] = []
    manifest = hub_store.add_from_source(
        "tiny",
        {"type": "huggingface", "repo": "acme/tiny", "snapshot": True, "token": "hf_secret"},
        progress=lambda *args: calls.append(args),
    )
    assert manifest.kind == "directory"
    assert {f.path: (f.sha256, f.size) for f in manifest.files} == {
        name: (sha(data), len(data)) for name, data in repo.files.items()
    }
    assert manifest.total_bytes == sum(len(d) for d in repo.files.values())
    assert manifest.source == {
        "type": "huggingface", "repo": "acme/tiny", "snapshot": True, "token_used": True,
        "commit": COMMIT,
    }  # fmt: skip
    # Progress names each file, counts its bytes up to its size, and numbers the files.
    last = {name: (done, total, index) for name, done, total, index in calls}
    assert {n: (d, t) for n, (d, t, _) in last.items()} == {
        n: (len(d), len(d)) for n, d in repo.files.items()
    }
    assert sorted(i for _, _, i in last.values()) == list(range(len(repo.files)))
    assert any(done == 0 for _, done, _, _ in calls)  # a bar starts at 0 before bytes arrive
    # The real client talked to our server: model info, then HEAD + GET per file, with the token.
    methods = [(m, p.split("?")[0]) for m, p, _ in fake_hub.requests]
    assert ("GET", "/api/models/acme/tiny/revision/main") in methods
    assert ("HEAD", f"/acme/tiny/resolve/{COMMIT}/model-q4.gguf") in methods
    assert ("GET", f"/acme/tiny/resolve/{COMMIT}/model-q4.gguf") in methods
    assert all(auth == "Bearer hf_secret" for _, _, auth in fake_hub.requests)
    # The hub cache is inside the store, and the artifact holds the bytes.
    assert (hub_store.hub_cache / "models--acme--tiny" / "refs" / "main").read_text() == COMMIT
    files = hub_store.local_path(manifest.ref)
    assert (files / "model-q4.gguf").read_bytes() == repo.files["model-q4.gguf"]
    assert "hf_secret" not in json.dumps(manifest.to_dict())


def test_allow_patterns_and_single_filename(
    hub_store: DirectoryArtifactStore, repo: FakeRepo
):
    subset = hub_store.add_from_source(
        "tiny-st",
        {"type": "huggingface", "repo": "acme/tiny", "allow_patterns": ["*.json", "*.safetensors"]},
    )
    assert [f.path for f in subset.files] == ["config.json", "model.safetensors", "tokenizer.json"]

    single = hub_store.add_from_source(
        "tiny-gguf",
        {"type": "huggingface", "repo": "acme/tiny", "revision": "v1", "filename": "model-q4.gguf"},
    )
    assert single.kind == "file"
    assert single.primary_path == "model-q4.gguf"
    assert single.files[0].sha256 == sha(repo.files["model-q4.gguf"])
    assert single.source["revision"] == "v1" and single.source["commit"] == COMMIT


def test_offline_mode_uses_the_prepared_cache_without_network(
    hub_store: DirectoryArtifactStore, fake_hub: FakeHub, repo: FakeRepo,
    monkeypatch: pytest.MonkeyPatch,
):  # fmt: skip
    online = hub_store.add_from_source(
        "tiny", {"type": "huggingface", "repo": "acme/tiny", "allow_patterns": "*.gguf"}
    )
    hub_store.remove(online.ref)
    fake_hub.requests.clear()

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls: list[tuple[str, int, int | None, int]] = []
    offline = hub_store.add_from_source(
        "tiny",
        {"type": "huggingface", "repo": "acme/tiny", "allow_patterns": "*.gguf"},
        progress=lambda *a: calls.append(a),
    )
    assert offline.ref == online.ref
    assert fake_hub.requests == []
    size = len(repo.files["model-q4.gguf"])
    assert calls == [("model-q4.gguf", size, size, 0)]

    single = hub_store.add_from_source(
        "tiny-one", {"type": "huggingface", "repo": "acme/tiny", "filename": "model-q4.gguf"}
    )
    assert single.files == offline.files
    assert fake_hub.requests == []


def test_offline_mode_without_a_cached_copy_says_how_to_fix(
    hub_store: DirectoryArtifactStore, fake_hub: FakeHub, repo: FakeRepo
):
    offline_store = DirectoryArtifactStore(hub_store.root, offline=True)
    with pytest.raises(SourceUnavailable, match="HF_HUB_OFFLINE"):
        offline_store.add_from_source(
            "tiny", {"type": "huggingface", "repo": "acme/tiny", "snapshot": True}
        )
    assert fake_hub.requests == []
    assert store_leftovers(hub_store) == []


def test_unknown_repo_revision_and_file_are_reported(
    hub_store: DirectoryArtifactStore, repo: FakeRepo
):
    with pytest.raises(SourceUnavailable, match="not found"):
        hub_store.add_from_source("x", {"type": "huggingface", "repo": "acme/nope"})
    with pytest.raises(SourceUnavailable, match="revision"):
        hub_store.add_from_source(
            "x", {"type": "huggingface", "repo": "acme/tiny", "revision": "no-such-branch"}
        )
    with pytest.raises(SourceUnavailable, match=r"config\.json"):
        hub_store.add_from_source(
            "x", {"type": "huggingface", "repo": "acme/tiny", "filename": "missing.gguf"}
        )
    with pytest.raises(SourceUnavailable, match="no files match"):
        hub_store.add_from_source(
            "x", {"type": "huggingface", "repo": "acme/tiny", "allow_patterns": "*.onnx"}
        )
    assert store_leftovers(hub_store) == []


def test_hub_file_not_matching_its_lfs_sha256_is_refused(
    hub_store: DirectoryArtifactStore, repo: FakeRepo
):
    repo.tampered["model-q4.gguf"] = b"GGUF" + b"\x08" * 40_000  # same size, other bytes
    with pytest.raises(ChecksumMismatch, match=sha(repo.files["model-q4.gguf"])):
        hub_store.add_from_source(
            "x", {"type": "huggingface", "repo": "acme/tiny", "filename": "model-q4.gguf"}
        )
    assert store_leftovers(hub_store) == []


def test_remote_file_names_escaping_the_artifact_are_refused(
    hub_store: DirectoryArtifactStore, fake_hub: FakeHub
):
    fake_hub.repos["evil/repo"] = FakeRepo(files={"../../escape.txt": b"x", "ok.txt": b"y"})
    with pytest.raises(Exception, match="climbs out"):
        hub_store.add_from_source("evil", {"type": "huggingface", "repo": "evil/repo"})
    assert store_leftovers(hub_store) == []
    assert not (hub_store.root.parent / "escape.txt").exists()


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"repo": "../etc"}, "owner/name"),
        ({"repo": "a/b", "filename": "x.gguf", "allow_patterns": "*"}, "not both"),
        ({"repo": "a/b", "snapshot": False}, "filename"),
        ({"repo": "a/b", "filename": "/etc/passwd"}, "absolute"),
    ],
)
def test_malformed_hub_specs_are_refused(
    hub_store: DirectoryArtifactStore, spec: dict[str, object], match: str
):
    with pytest.raises((InvalidSource, ValueError), match=match):
        hub_store.add_from_source("x", {"type": "huggingface", **spec})
