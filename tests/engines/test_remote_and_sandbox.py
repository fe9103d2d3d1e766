"""The remote OpenAI-compatible provider's readiness, and what engine processes inherit."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from engine_helpers import make_archive, make_node

from engines.errors import InstallError, NotLaunchable
from engines.openai import OpenAIProvider
from engines.plan import InstallPlan, InstallRecord
from engines.registry import get_provider
from engines.sandbox import resolve_run_as, sanitized_env

openai = get_provider("openai")
llamacpp = get_provider("llamacpp")
KEY = "sk-test-very-secret"


@pytest.fixture
def endpoint() -> Iterator[str]:
    """An OpenAI-compatible stand-in: GET /v1/models answers 200 only with the right key."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = self.headers.get("Authorization") == f"Bearer {KEY}"
            status = 200 if ok and self.path == "/v1/models" else (401 if not ok else 404)
            body = json.dumps({"object": "list", "data": [{"id": "gpt-x"}]}).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_remote_endpoint_is_ready_when_it_answers_models(endpoint: str, tmp_path: Path) -> None:
    report = openai.check_ready(make_node(tmp_path), {"base_url": endpoint, "api_key": KEY})
    assert report.ready and not report.missing_shared


def test_a_refused_key_is_a_missing_shared_dependency_and_is_never_echoed(
    endpoint: str, tmp_path: Path
) -> None:
    report = openai.check_ready(make_node(tmp_path), {"base_url": endpoint, "api_key": "sk-bad"})
    assert not report.ready
    item = report.missing_shared[0]
    assert item["dependency_key"] == "endpoint"
    assert "401" in item["reason"] and "api_key" in item["reason"]
    assert "sk-bad" not in report.model_dump_json()


def test_an_unreachable_endpoint_is_not_ready(tmp_path: Path) -> None:
    cfg = {"base_url": "http://127.0.0.1:9/v1", "api_key": KEY}
    report = openai.check_ready(make_node(tmp_path), cfg)
    assert not report.ready and "check base_url" in report.missing_shared[0]["reason"]
    assert KEY not in report.model_dump_json()


def test_remote_provider_runs_no_process_and_its_handoff_has_no_key(tmp_path: Path) -> None:
    cfg = {"base_url": "https://api.example/v1", "api_key": KEY}
    with pytest.raises(NotLaunchable, match="base_url"):
        openai.prepare("m", cfg, make_node(tmp_path))
    handoff = OpenAIProvider().remote_handoff(cfg, "gpt-x")
    assert handoff["url"] == "https://api.example/v1"
    assert KEY not in json.dumps(handoff)


def test_engine_environment_is_an_allow_list() -> None:
    env = sanitized_env(
        {"CUDA_VISIBLE_DEVICES": "0"},
        source={"PATH": "/usr/bin", "OPENAI_API_KEY": "k", "ROUNDHOUSE_HOME": "/x",
                "RAY_ADDRESS": "a", "LC_ALL": "C.UTF-8", "HOME": "/home/u"},
    )
    assert env == {"PATH": "/usr/bin", "LC_ALL": "C.UTF-8", "HOME": "/home/u",
                   "CUDA_VISIBLE_DEVICES": "0"}


def test_prepared_engine_does_not_inherit_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-leak")
    monkeypatch.setenv("ROUNDHOUSE_DATABASE_URL", "postgresql://u:pw@db/x")
    archive, sha = make_archive(tmp_path / "dist")
    node = make_node(tmp_path, allowed_url_prefixes=["file://"])
    cfg = {"install_mode": "binary", "binary_url": archive.as_uri(), "binary_sha256": sha}
    record = llamacpp.install(llamacpp.plan_install(cfg, node), settings=node.settings)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    prepared = llamacpp.prepare(model, cfg, node, record=record)
    assert "OPENAI_API_KEY" not in prepared.env
    assert not any(k.startswith("ROUNDHOUSE_") for k in prepared.env)


def test_a_root_service_runs_engines_as_the_configured_user() -> None:
    who = resolve_run_as("nobody", euid=0)
    assert who.user == "nobody" and who.uid is not None and who.uid != 0
    assert resolve_run_as("nobody", euid=1000).uid is None  # non-root: stay as we are
    assert resolve_run_as("", euid=0).uid is None
    with pytest.raises(InstallError, match="ROUNDHOUSE_ENGINE_USER"):
        resolve_run_as("no-such-user-rh", euid=0)


def test_install_records_survive_a_round_trip(tmp_path: Path) -> None:
    plan = llamacpp.plan_install(None, make_node(tmp_path))
    plan.install_dir.mkdir(parents=True)
    record = InstallRecord(provider="llamacpp", mode="package", engine_version="v",
                           cache_key=plan.cache_key, install_dir=str(plan.install_dir),
                           plan=plan, python="/nowhere/python")
    record.save()
    loaded = InstallRecord.load(plan.install_dir)
    assert loaded == record and isinstance(loaded.plan, InstallPlan)
