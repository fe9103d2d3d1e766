"""Helpers for the engine tests: nodes with temp roots, fake llama-server archives, a
counting HTTP file server."""

from __future__ import annotations

import hashlib
import http.server
import io
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from engines.base import GpuFact, NodeFacts
from engines.node import Node
from events.settings import Settings

FAKE_ENGINE = Path(__file__).with_name("fake_engine.py")


def make_node(
    tmp: Path, *, gpus: int = 0, cuda_toolkit: bool = False, **settings: Any
) -> Node:
    """A node with its engine root and cache under ``tmp`` and the given settings."""
    facts = NodeFacts(
        node_id="node-test",
        cpu_count=2,
        gpus=[GpuFact(index=i, name="Fake GPU") for i in range(gpus)],
        cuda_toolkit=cuda_toolkit,
    )
    s = Settings.from_env(
        {}, engine_root=str(tmp / "engines"), cache_dir=str(tmp / "cache"), **settings
    )
    return Node(facts=facts, settings=s)


def fake_server_script(extra_args: str = "") -> str:
    """A ``llama-server`` stand-in: prints a version for --version, else runs fake_engine."""
    return (
        f"#!{sys.executable}\n"
        "import os, sys\n"
        "if '--version' in sys.argv:\n"
        "    print('version: 9999 (fakebuild)', file=sys.stderr)\n"
        "    sys.exit(0)\n"
        f"os.execv({sys.executable!r}, [{sys.executable!r}, {str(FAKE_ENGINE)!r}, "
        f"*sys.argv[1:], *{extra_args.split()!r}])\n"
    )


def make_archive(
    directory: Path, extra_args: str = "", name: str = "llama.tar.gz"
) -> tuple[Path, str]:
    """A tar.gz holding ``build/bin/llama-server``; returns (path, sha256)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    data = fake_server_script(extra_args).encode()
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("llama-b9999/build/bin/llama-server")
        info.size = len(data)
        info.mode = 0o755
        tar.addfile(info, io.BytesIO(data))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


class _Counter:
    def __init__(self) -> None:
        self.gets = 0
        self.lock = threading.Lock()


@contextmanager
def file_server(directory: Path, delay_s: float = 0.0) -> Iterator[tuple[str, _Counter]]:
    """Serve ``directory`` over HTTP on 127.0.0.1; yields (base URL, GET counter)."""
    counter = _Counter()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, directory=str(directory), **kw)

        def do_GET(self) -> None:
            with counter.lock:
                counter.gets += 1
            time.sleep(delay_s)
            super().do_GET()

        def log_message(self, *a: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", counter
    finally:
        server.shutdown()
        server.server_close()


def pid_alive(pid: int) -> bool:
    """True when ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_for(predicate: Any, timeout_s: float = 30.0, what: str = "condition") -> None:
    """Poll ``predicate`` until true; fail the test naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
