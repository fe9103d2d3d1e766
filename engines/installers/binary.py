"""Binary mode: a pinned archive URL and its sha256: download, verify, unpack, run.

Downloads are kept in ``<cache>/downloads/<sha256>`` after they verify, so a
second engine root on the same machine does not download again. A checksum
mismatch deletes the download and names both checksums.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path
from urllib.parse import unquote, urlparse

import httpx

from engines.errors import ChecksumMismatch, InstallError
from engines.plan import InstallPlan, InstallProgress, InstallRecord, ProgressCallback
from engines.sandbox import RunAs, chown_tree, run_step, sanitized_env
from events.settings import Settings

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, dest: Path, report: ProgressCallback, timeout_s: float = 60.0) -> None:
    """Fetch ``url`` (http, https or file) into ``dest`` with progress reports.

    Raises InstallError naming the URL and the HTTP status or OS error.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    parsed = urlparse(url)
    try:
        if parsed.scheme == "file":
            src = Path(unquote(parsed.path))
            total = src.stat().st_size
            done = 0
            with src.open("rb") as fin, dest.open("wb") as fout:
                for block in iter(lambda: fin.read(_CHUNK), b""):
                    fout.write(block)
                    done += len(block)
                    frac = done / max(total, 1)
                    report(InstallProgress("download", f"{done}/{total} bytes", frac))
            return
        with httpx.stream("GET", url, follow_redirects=True, timeout=timeout_s) as resp:
            if resp.status_code != 200:
                raise InstallError(
                    f"download of {url} failed: HTTP {resp.status_code}; check binary_url"
                )
            total = int(resp.headers.get("content-length") or 0)
            done = 0
            with dest.open("wb") as fout:
                for block in resp.iter_bytes(_CHUNK):
                    fout.write(block)
                    done += len(block)
                    report(
                        InstallProgress(
                            "download",
                            f"{done}/{total or '?'} bytes",
                            done / total if total else None,
                        )
                    )
    except (OSError, httpx.HTTPError) as exc:
        dest.unlink(missing_ok=True)
        raise InstallError(f"download of {url} failed: {exc}; check binary_url") from None


def _safe_target(root: Path, member: str) -> Path:
    target = (root / member).resolve()
    if not target.is_relative_to(root.resolve()):
        raise InstallError(f"archive member {member!r} escapes the unpack directory; refusing")
    return target


def unpack(archive: Path, dest: Path, binary_name: str) -> None:
    """Unpack a tar or zip archive into ``dest``; a plain file is copied as ``binary_name``."""
    dest.mkdir(parents=True, exist_ok=True)
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                _safe_target(dest, member.name)
            tar.extractall(dest, filter="data")
    elif zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                target = _safe_target(dest, info.filename)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as fin, target.open("wb") as fout:
                    shutil.copyfileobj(fin, fout)
                mode = (info.external_attr >> 16) & 0o777
                if mode:
                    target.chmod(mode)
    else:
        shutil.copyfile(archive, dest / binary_name)


def find_binary(root: Path, name: str) -> Path:
    """The file called ``name`` under ``root`` (shallowest first), made executable."""
    found = sorted(
        (p for p in root.rglob(name) if p.is_file()), key=lambda p: (len(p.parts), str(p))
    )
    if not found:
        listing = ", ".join(sorted(str(p.relative_to(root)) for p in root.rglob("*"))[:20])
        raise InstallError(
            f"the archive has no file named {name!r} (it holds: {listing or 'nothing'}); "
            "point binary_url at an archive that contains the server"
        )
    binary = found[0]
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return binary


def binary_version(binary: Path, run_as: RunAs | None = None) -> str:
    """The first line the binary prints for ``--version``; raises InstallError if it fails."""
    out = run_step(
        f"run {binary.name} --version",
        [str(binary), "--version"],
        env=sanitized_env(),
        run_as=run_as,
        timeout_s=60,
    )
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    version = next((line for line in lines if "version" in line.lower()), lines[0] if lines else "")
    return version


def install_binary(
    plan: InstallPlan, report: ProgressCallback, settings: Settings, run_as: RunAs
) -> InstallRecord:
    """Download (or reuse from the download cache), verify, unpack and run ``--version``."""
    url: str = plan.inputs["url"]
    expected: str = plan.inputs["sha256"].lower()
    binary_name: str = plan.inputs.get("binary_name", "llama-server")
    cache = Path(plan.cache_dir) / "downloads"
    cached = cache / expected
    if cached.exists() and sha256_file(cached) == expected:
        report(InstallProgress("download", f"using cached download {expected[:12]}", 0.5))
    else:
        part = plan.install_dir / (os.path.basename(urlparse(url).path) or "download")
        report(InstallProgress("download", f"downloading {url}", 0.0))
        download(url, part, report)
        actual = sha256_file(part)
        if actual != expected:
            part.unlink(missing_ok=True)
            raise ChecksumMismatch(url, expected, actual)
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".{expected}.{os.getpid()}"
        shutil.move(str(part), tmp)
        tmp.replace(cached)
    report(InstallProgress("unpack", "unpacking", 0.8))
    dist = plan.install_dir / "dist"
    unpack(cached, dist, binary_name)
    chown_tree(plan.install_dir, run_as)
    binary = find_binary(dist, binary_name)
    version = binary_version(binary, run_as)
    stamp = f"sha256:{expected}"
    return InstallRecord(
        provider=plan.provider,
        mode="binary",
        engine_version=stamp + (f" ({version})" if version else ""),
        cache_key=plan.cache_key,
        install_dir=str(plan.install_dir),
        plan=plan,
        bin=str(binary),
        gpu_backend=plan.gpu_backend,
    )
