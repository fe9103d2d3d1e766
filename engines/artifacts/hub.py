"""The ``huggingface`` source: the real ``huggingface_hub`` download, into a cache inside the store.

Online, the repo's model info (``/api/models/{repo}/revision/{rev}?blobs=true``)
pins the revision to a commit and lists the files with their sizes and LFS
sha256; each selected file is then fetched with ``hf_hub_download`` at that
commit (HEAD + GET on ``/{repo}/resolve/{commit}/{file}``), one at a time so
that progress can name the file and its index. Offline (``HF_HUB_OFFLINE``,
``offline: true`` or the store's offline flag) the same call goes to
``snapshot_download`` / ``hf_hub_download`` with ``local_files_only=True``
against the hub cache, which must already hold the revision.

The hub cache is always ``<store>/hub-cache`` (never the user's home cache);
files are hardlinked from it into the artifact (copied across volumes), and
their sha256 is computed here and checked against the hub's LFS sha256 when
the hub lists one.
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from engines.artifacts.errors import (
    ChecksumMismatch,
    DiskFull,
    DownloadInterrupted,
    InvalidSource,
    SourceUnavailable,
    UnsafeArtifactPath,
)
from engines.artifacts.sources import ArtifactKind
from engines.artifacts.staging import (
    ProgressCallback,
    StagedFile,
    Staging,
    check_room,
    disk_full_error,
    ensure_inside,
    safe_relpath,
)

_TRUE = {"1", "true", "yes", "on"}


def env_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` asks for offline mode right now (read at call time)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def env_endpoint() -> str | None:
    """The hub endpoint from ``HF_ENDPOINT`` (read at call time), or None for the default."""
    value = os.environ.get("HF_ENDPOINT", "").strip()
    return value.rstrip("/") or None


class _ProgressBar:
    """A tqdm stand-in handed to huggingface_hub: forwards byte counts for one file."""

    def __init__(
        self,
        name: str,
        index: int,
        callback: ProgressCallback | None,
        reported: set[str],
        total: int | None = None,
        initial: int = 0,
    ) -> None:
        self.name = name
        self.index = index
        self.callback = callback
        self.reported = reported
        self.total = total
        self.n = initial
        self._emit()

    def _emit(self) -> None:
        self.reported.add(self.name)
        if self.callback is not None:
            self.callback(self.name, int(self.n), self.total, self.index)

    def update(self, n: float | None = 1) -> None:
        self.n += int(n or 0)
        self._emit()

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to release: this bar only forwards counts to the callback."""

    def __getattr__(self, attr: str) -> Callable[..., None]:
        # set_description, refresh, set_postfix_str, update_transfer...: display-only calls.
        if attr.startswith("__"):
            raise AttributeError(attr)
        return lambda *args, **kwargs: None


def _progress_class(
    name: str, index: int, callback: ProgressCallback | None, reported: set[str]
) -> type:
    class FileProgress(_ProgressBar):
        def __init__(self, *args: Any, total: int | None = None, initial: int = 0, **kw: Any):
            super().__init__(name, index, callback, reported, total=total, initial=initial)

    return FileProgress


def _parse_spec(spec: dict[str, Any]) -> dict[str, Any]:
    repo = spec.get("repo")
    if not isinstance(repo, str) or not repo or repo.count("/") > 1 or ".." in repo:
        raise InvalidSource(
            f"huggingface source needs 'repo' as 'owner/name' (e.g. 'HuggingFaceTB/SmolLM2-135M'), "
            f"got {repo!r}"
        )
    revision = spec.get("revision") or "main"
    if not isinstance(revision, str) or ".." in revision or revision.startswith("/"):
        raise InvalidSource(
            f"huggingface source 'revision' {revision!r} is not a branch, tag or commit"
        )
    filename = spec.get("filename")
    allow = spec.get("allow_patterns")
    ignore = spec.get("ignore_patterns")
    if filename is not None and allow is not None:
        raise InvalidSource(
            "huggingface source takes either 'filename' (one file) or 'allow_patterns' (a filtered "
            "snapshot), not both"
        )
    if filename is not None:
        filename = safe_relpath(filename, "huggingface filename")
    elif spec.get("snapshot") is False and allow is None:
        raise InvalidSource(
            "huggingface source with snapshot=false needs 'filename' or 'allow_patterns' to say "
            "which files to fetch"
        )
    for key, value in (("allow_patterns", allow), ("ignore_patterns", ignore)):
        if value is not None and not (
            isinstance(value, str)
            or (isinstance(value, list) and all(isinstance(v, str) for v in value))
        ):
            raise InvalidSource(f"huggingface source '{key}' must be a string or a list of strings")
    repo_type = spec.get("repo_type", "model")
    if repo_type not in ("model", "dataset", "space"):
        raise InvalidSource("huggingface source 'repo_type' must be model, dataset or space")
    token = spec.get("token")
    if token is not None and not isinstance(token, str):
        raise InvalidSource("huggingface source 'token' must be a string")
    return {
        "repo": repo, "revision": revision, "filename": filename, "allow": allow,
        "ignore": ignore, "repo_type": repo_type, "token": token,
    }  # fmt: skip


def _translate(exc: BaseException, what: str, cache_dir: Path, offline: bool) -> Exception:
    """Map a huggingface_hub / transport error onto our errors with a next step."""
    from huggingface_hub import errors as hf_errors

    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return disk_full_error(exc, cache_dir, what)
    if isinstance(exc, hf_errors.GatedRepoError):
        return SourceUnavailable(
            f"{what} is gated: accept its terms on the hub and pass a 'token' with access"
        )
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        return SourceUnavailable(
            f"{what}: the repository was not found (or is private); check the name or pass a "
            "'token' that can read it"
        )
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        return SourceUnavailable(f"{what}: the revision does not exist; check 'revision'")
    if isinstance(exc, hf_errors.EntryNotFoundError) and not isinstance(
        exc, hf_errors.LocalEntryNotFoundError
    ):
        return SourceUnavailable(f"{what}: the file is not in the repository; check 'filename'")
    local_errors = (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled)
    if offline or isinstance(exc, local_errors):
        return SourceUnavailable(
            f"{what} is not in the hub cache {cache_dir} and offline mode is on (or the hub is "
            "unreachable); add it once with network access (unset HF_HUB_OFFLINE), then retry"
        )
    if isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError, httpx.ReadTimeout)):
        return DownloadInterrupted(
            f"download of {what} was interrupted ({type(exc).__name__}: {exc}); nothing was "
            "stored. Retry"
        )
    if isinstance(exc, OSError) and "Consistency check failed" in str(exc):
        return DownloadInterrupted(
            f"download of {what} came back short ({exc}); nothing was stored. Retry"
        )
    if isinstance(exc, (httpx.HTTPError, hf_errors.HfHubHTTPError)):
        return SourceUnavailable(
            f"could not fetch {what} ({type(exc).__name__}: {exc}); check the network, "
            "HF_ENDPOINT and the token"
        )
    return SourceUnavailable(f"could not fetch {what} ({type(exc).__name__}: {exc})")


def _commit_of(path: Path) -> str | None:
    """The commit hash of a file inside ``.../snapshots/<commit>/...`` of the hub cache."""
    parts = path.parts
    for i, part in enumerate(parts[:-1]):
        if part == "snapshots":
            return parts[i + 1]
    return None


def _write_ref(cache_dir: Path, repo: str, repo_type: str, revision: str, commit: str) -> None:
    """Record ``revision → commit`` in the hub cache (its ``refs/`` file) for later offline use."""
    from huggingface_hub.file_download import repo_folder_name

    if revision == commit:
        return
    ref_file = cache_dir / repo_folder_name(repo_id=repo, repo_type=repo_type) / "refs" / revision
    ref_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = ref_file.with_name(f".{ref_file.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(commit)
    os.replace(tmp, ref_file)


def stage_huggingface(
    spec: dict[str, Any],
    staging: Staging,
    progress: ProgressCallback | None,
    *,
    cache_dir: Path,
    endpoint: str | None = None,
    offline: bool = False,
) -> tuple[list[StagedFile], ArtifactKind, dict[str, Any]]:
    """Fetch a repo file or (filtered) snapshot into staging; return files, kind, resolved facts.

    The resolved facts are ``{"commit": <sha>}``. Raises InvalidSource for a
    malformed spec, SourceUnavailable when the hub refuses or offline mode has
    no cached copy, DownloadInterrupted, DiskFull, or ChecksumMismatch when a
    file's sha256 differs from the hub's LFS sha256.
    """
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.utils import filter_repo_objects

    s = _parse_spec(spec)
    offline = offline or bool(spec.get("offline")) or env_offline()
    endpoint = spec.get("endpoint") or endpoint or env_endpoint()
    cache_dir.mkdir(parents=True, exist_ok=True)
    what = f"huggingface {s['repo']}@{s['revision']}"
    if s["filename"]:
        what += f" file {s['filename']}"
    reported: set[str] = set()
    common = {
        "repo_type": s["repo_type"], "cache_dir": str(cache_dir), "token": s["token"],
    }  # fmt: skip

    # 1. Decide which files, at which commit, and where they sit in the hub cache.
    wanted: list[tuple[str, Path]] = []
    expected_sha: dict[str, str] = {}
    expected_size: dict[str, int] = {}
    commit: str | None = None
    try:
        if offline:
            if s["filename"]:
                local = hf_hub_download(
                    s["repo"], s["filename"], revision=s["revision"], local_files_only=True,
                    endpoint=endpoint, **common,
                )  # fmt: skip
                wanted = [(s["filename"], Path(local))]
                commit = _commit_of(Path(local))
            else:
                snapshot = snapshot_download(
                    s["repo"], revision=s["revision"], local_files_only=True,
                    allow_patterns=s["allow"], ignore_patterns=s["ignore"],
                    endpoint=endpoint, **common,
                )  # fmt: skip
                folder = Path(snapshot)
                commit = folder.name
                rels = sorted(
                    p.relative_to(folder).as_posix()
                    for p in folder.rglob("*")
                    if p.is_file() and ".cache" not in p.relative_to(folder).parts
                )
                for rel in filter_repo_objects(
                    rels, allow_patterns=s["allow"], ignore_patterns=s["ignore"]
                ):
                    wanted.append((safe_relpath(rel, "hub file"), folder / rel))
        else:
            api = HfApi(endpoint=endpoint, token=s["token"])
            info = api.repo_info(
                s["repo"], revision=s["revision"], repo_type=s["repo_type"], files_metadata=True
            )
            commit = info.sha
            if not commit:
                raise SourceUnavailable(f"{what}: the hub did not say which commit it resolved to")
            siblings = {sib.rfilename: sib for sib in (getattr(info, "siblings", None) or [])}
            if s["filename"]:
                if s["filename"] not in siblings:
                    listing = ", ".join(sorted(siblings)[:20]) or "(none)"
                    raise SourceUnavailable(
                        f"{what}: no such file in the repository; it has: {listing}"
                    )
                names = [s["filename"]]
            else:
                names = list(
                    filter_repo_objects(
                        sorted(siblings), allow_patterns=s["allow"], ignore_patterns=s["ignore"]
                    )
                )
            for name in names:
                safe_relpath(name, "hub file name")
                sib = siblings[name]
                if sib.lfs is not None:
                    expected_sha[name] = sib.lfs.sha256.lower()
                    expected_size[name] = sib.lfs.size
                elif sib.size is not None:
                    expected_size[name] = sib.size
            check_room(cache_dir, sum(expected_size.values()), what)
            for index, name in enumerate(names):
                local = hf_hub_download(
                    s["repo"], name, revision=commit, endpoint=endpoint,
                    tqdm_class=_progress_class(name, index, progress, reported), **common,
                )  # fmt: skip
                wanted.append((name, Path(local)))
            _write_ref(cache_dir, s["repo"], s["repo_type"], s["revision"], commit)
    except (SourceUnavailable, InvalidSource, UnsafeArtifactPath, DiskFull):
        raise
    except Exception as exc:
        raise _translate(exc, what, cache_dir, offline) from None
    if not wanted:
        raise SourceUnavailable(
            f"{what}: no files match allow_patterns={s['allow']!r} "
            f"ignore_patterns={s['ignore']!r}; widen the patterns"
        )

    # 2. Link (or copy) each cached file into staging, hashing it and checking the hub's sha256.
    staged: list[StagedFile] = []
    for index, (name, cached) in enumerate(wanted):
        real = ensure_inside(cache_dir, cached, f"hub cache file {name}")
        try:
            item = staging.link_file(name, real)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise disk_full_error(exc, staging.dir, name) from None
            raise
        want = expected_sha.get(name)
        if want is not None and item.sha256 != want:
            raise ChecksumMismatch(f"{what} file {name}", want, item.sha256)
        if name in expected_size and item.size != expected_size[name]:
            raise DownloadInterrupted(
                f"{what} file {name}: got {item.size} bytes, the hub lists "
                f"{expected_size[name]}; nothing was stored. Retry"
            )
        if progress is not None and name not in reported:
            # Served from the hub cache: nothing was downloaded, report it as complete.
            progress(name, item.size, item.size, index)
        staged.append(item)
    kind: ArtifactKind = "file" if s["filename"] else "directory"
    return staged, kind, {"commit": commit}
