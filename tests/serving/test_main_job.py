"""The README's main job (scripts/serve_main.py, what scripts/main.sh runs): started as a user
would, answered by the official openai client, stopped with SIGTERM leaving no process
behind; a second start reuses the stored rows."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
from serving_helpers import free_port, pid_alive

from cluster.head import _with_descendants
from events.settings import Settings

pytestmark = [pytest.mark.ray, pytest.mark.engine, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]


class MainJob:
    """One run of the main job as a subprocess, its output collected line by line."""

    def __init__(self, home: Path, port: int) -> None:
        env = {**os.environ, "ROUNDHOUSE_HOME": str(home),
               "ROUNDHOUSE_CACHE_DIR": str(Settings.from_env().cache_path),
               "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("RAY_ADDRESS", None)
        env.pop("ROUNDHOUSE_API_TOKEN", None)
        self.proc = subprocess.Popen(
            [sys.executable, "scripts/serve_main.py", "--port", str(port)], cwd=REPO, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            start_new_session=True)
        self.lines: list[str] = []
        # A thread reads the output: a selector on a buffered pipe misses lines that
        # arrived in the same chunk as the one before.
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for_line(self, pattern: str, timeout_s: float = 300.0) -> re.Match[str]:
        """The first output line matching ``pattern``; fails with the output so far."""
        regex = re.compile(pattern)
        for line in self.lines:
            if (found := regex.search(line)) is not None:
                return found
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                item = self._queue.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if item is None:
                break
            self.lines.append(item)
            if (found := regex.search(item)) is not None:
                return found
        raise AssertionError(f"no line matching {pattern!r}; output:\n" + "\n".join(self.lines))

    def stop(self) -> int:
        """SIGTERM, wait for the exit; return the exit code (the output is kept)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._reader.join(timeout=30)
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.lines.append(line)
        return int(self.proc.returncode)


def _all_gone(pids: list[int], timeout_s: float = 60.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    left = pids
    while time.monotonic() < deadline:
        left = [p for p in pids if pid_alive(p)]
        if not left:
            return []
        time.sleep(0.5)
    return left


def test_main_job_serves_smollm2_and_stops_cleanly(tmp_path: Path, llamacpp_env: object
                                                   ) -> None:
    port = free_port()
    job = MainJob(tmp_path / "home", port)
    try:
        url = job.wait_for_line(r"^gateway: (http://\S+)").group(1)
        token = job.wait_for_line(r"^admin token \(for \S+\): (\S+)").group(1)
        job.wait_for_line(r"curl .*/v1/chat/completions")
        assert url == f"http://127.0.0.1:{port}"
        assert (tmp_path / "home" / "api_token").read_text().strip() == token
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                               timeout=240)
        answer = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=8, temperature=0)
        assert answer.choices[0].message.content and answer.usage is not None
        stream = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "Count to three."}],
            max_tokens=8, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        first = "\n".join(job.lines)
        family = _with_descendants([job.proc.pid])
        assert len(family) > 3, "Ray's processes should run under the main job"
    finally:
        code = job.stop()
    assert code == 0, "\n".join(job.lines)
    assert "roundhouse: stopped" in job.lines
    assert _all_gone(family) == [], "\n".join(job.lines)

    again = MainJob(tmp_path / "home", port)
    try:
        again.wait_for_line(r"^gateway: ")
        rows = re.search(r"engine (\d+) \(llamacpp\) active; model (\d+) 'smollm2'", first)
        assert rows is not None, first
        assert again.wait_for_line(r"engine (\d+) \(llamacpp\) active; model (\d+)").groups() \
            == rows.groups()
        family = _with_descendants([again.proc.pid])
    finally:
        code = again.stop()
    assert code == 0, "\n".join(again.lines)
    assert _all_gone(family) == []
