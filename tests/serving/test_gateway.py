"""The gateway in-process (uvicorn + orchestrator + supervised processes) with the fake
engine: lifecycle behaviour that needs many loads. test_gateway_llamacpp.py runs the real
engine through the same stack."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import httpx
import openai
import pytest
from serving_helpers import (
    ADMIN_TOKEN,
    OTHER_ORG_TOKEN,
    fake_preparer,
    gateway_stack,
    pid_alive,
    wait_for,
)

CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF")
    return path


async def loaded(stack: object) -> list[dict[str, object]]:
    return await stack.serving.list_loaded_models()  # type: ignore[attr-defined]


async def test_openai_client_streamed_and_not_loads_on_first_request(
        tmp_path: Path, model_file: Path) -> None:
    async with gateway_stack(tmp_path, model_path=model_file, prepare=fake_preparer()) as st:
        assert await loaded(st) == []
        client = openai.AsyncOpenAI(base_url=st.url + "/v1", api_key="unused")
        models = await client.models.list()
        assert [m.id for m in models.data] == ["smollm2"]
        answer = await client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
        assert answer.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4 "
        assert answer.usage.completion_tokens == 5
        rows = await loaded(st)
        assert len(rows) == 1 and rows[0]["status"] == "loaded" and rows[0]["pid"]
        assert rows[0]["last_used_at"] and rows[0]["expires_at"]
        assert pid_alive(int(rows[0]["pid"]))  # type: ignore[call-overload]
        stream = await client.chat.completions.create(**CHAT, stream=True)  # type: ignore[call-overload]
        text = "".join([c.choices[0].delta.content or "" async for c in stream])
        assert text == "tok0 tok1 tok2 tok3 tok4 "
        comp = await client.completions.create(model="smollm2", prompt="x", max_tokens=2)
        assert comp.choices[0].text == "tok0 tok1 "
        assert st.serving.orchestrator.loads == 1


async def test_ten_concurrent_requests_cause_one_load(tmp_path: Path, model_file: Path) -> None:
    async with gateway_stack(tmp_path, model_path=model_file, prepare=fake_preparer()) as st:
        async with httpx.AsyncClient(base_url=st.url, timeout=60) as http:
            answers = await asyncio.gather(*(http.post("/v1/chat/completions", json=CHAT)
                                             for _ in range(10)))
        assert [a.status_code for a in answers] == [200] * 10
        assert st.serving.orchestrator.loads == 1
        events = await st.sdk.audit.events(model_registry_id=st.model_id)
        names = [e["event_name"] for e in events if e["event_name"].startswith("model.load")]
        assert names.count("model.load.requested") == 1, names


async def test_unload_frees_the_process_and_the_next_request_reloads(
        tmp_path: Path, model_file: Path) -> None:
    async with gateway_stack(tmp_path, model_path=model_file, prepare=fake_preparer()) as st, \
            httpx.AsyncClient(base_url=st.url, timeout=60) as http:
            assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200
            pid = int((await loaded(st))[0]["pid"])  # type: ignore[call-overload]
            result = await http.delete(f"/api/loaded-models/{st.engine_id}/{st.model_id}",
                                       headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
            assert result.json() == {"status": "ok", "unloaded": True}
            assert not pid_alive(pid)
            assert await loaded(st) == []
            again = await st.serving.unload_loaded_model(st.engine_id, st.model_id)
            assert again == {"status": "ok", "unloaded": False}
            assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200
            new_pid = int((await loaded(st))[0]["pid"])  # type: ignore[call-overload]
            assert new_pid != pid and pid_alive(new_pid)
            assert await st.serving.stop_engine(st.engine_id) == {"status": "ok",
                                                                  "stopped": True}
            assert not pid_alive(new_pid)
            engine = await st.sdk.models.engine_registry.get(st.engine_id)
            assert engine["status"] == "active"  # stop_engine does not deactivate


async def test_idle_runtime_is_unloaded_after_its_keep_alive(
        tmp_path: Path, model_file: Path) -> None:
    async with gateway_stack(tmp_path, model_path=model_file, prepare=fake_preparer(),
                             default_keep_alive_s=0.3) as st:
        async with httpx.AsyncClient(base_url=st.url, timeout=60) as http:
            assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200
        pid = int((await loaded(st))[0]["pid"])  # type: ignore[call-overload]
        for _ in range(200):
            if not await loaded(st):
                break
            await asyncio.sleep(0.05)
        assert await loaded(st) == [] and not pid_alive(pid)
        events = await st.sdk.audit.events(model_registry_id=st.model_id,
                                           event_name="model.unloaded")
        assert events and events[-1]["data"]["reason"] == "idle"


async def test_unload_barrier_lets_the_running_stream_finish_then_reloads(
        tmp_path: Path, model_file: Path) -> None:
    prepare = fake_preparer(tokens=20, token_delay=0.05)
    async with gateway_stack(tmp_path, model_path=model_file, prepare=prepare) as st:
        client = openai.AsyncOpenAI(base_url=st.url + "/v1", api_key="unused")
        stream = await client.chat.completions.create(  # type: ignore[call-overload]
            **{**CHAT, "max_tokens": 20}, stream=True)
        first = await stream.__anext__()
        pid = int((await loaded(st))[0]["pid"])  # type: ignore[call-overload]
        unload = asyncio.create_task(st.serving.unload_loaded_model(st.engine_id, st.model_id))
        await asyncio.sleep(0.1)
        later = asyncio.create_task(client.chat.completions.create(**CHAT))  # type: ignore[call-overload]
        rest = [c.choices[0].delta.content or "" async for c in stream]
        text = (first.choices[0].delta.content or "") + "".join(rest)
        assert text == "".join(f"tok{i} " for i in range(20))  # finished in full
        assert (await unload)["unloaded"] is True
        assert not pid_alive(pid)
        answer = await later
        assert answer.choices[0].message.content
        assert int((await loaded(st))[0]["pid"]) != pid  # type: ignore[call-overload]
        assert st.serving.orchestrator.loads == 2


async def test_full_queue_answers_429_with_retry_after(tmp_path: Path, model_file: Path) -> None:
    prepare = fake_preparer(tokens=10, token_delay=0.1)
    async with gateway_stack(tmp_path, model_path=model_file, prepare=prepare,
                             max_running=1, max_queue=1, retry_after_s=3) as st, \
            httpx.AsyncClient(base_url=st.url, timeout=60) as http:
            slow = [asyncio.create_task(http.post("/v1/chat/completions",
                                                  json={**CHAT, "max_tokens": 10}))
                    for _ in range(2)]
            while len(st.serving.orchestrator.list_jobs()) < 2:
                await asyncio.sleep(0.02)
            refused = await http.post("/v1/chat/completions", json=CHAT)
            assert refused.status_code == 429
            assert refused.headers["retry-after"] == "3"
            assert refused.json()["error"]["code"] == "queue_full"
            jobs = (await http.get("/api/jobs", headers={
                "Authorization": f"Bearer {ADMIN_TOKEN}"})).json()
            assert sorted(j["state"] for j in jobs) in (["batching", "queued"],
                                                        ["loading", "queued"])
            assert all(r.status_code == 200 for r in await asyncio.gather(*slow))


async def test_killed_engine_gives_a_clean_error_then_is_restarted(
        tmp_path: Path, model_file: Path) -> None:
    prepare = fake_preparer(tokens=40, token_delay=0.05)
    async with gateway_stack(tmp_path, model_path=model_file, prepare=prepare) as st:
        client = openai.AsyncOpenAI(base_url=st.url + "/v1", api_key="unused", max_retries=0)
        stream = await client.chat.completions.create(  # type: ignore[call-overload]
            **{**CHAT, "max_tokens": 40}, stream=True)
        await stream.__anext__()
        pid = int((await loaded(st))[0]["pid"])  # type: ignore[call-overload]
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(openai.APIError, match="broke off the stream"):
            async for _chunk in stream:
                pass
        assert st.serving.orchestrator.list_jobs() == []
        answer = await client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
        assert answer.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4 "
        runtime = st.manager.runtimes[(st.engine_id, st.model_id)]
        assert runtime.supervisor is not None and runtime.supervisor.pid != pid
        assert runtime.supervisor.restarts == 1
        new_pid = runtime.supervisor.pid

        async def view_has_new_pid() -> bool:
            rows = await loaded(st)
            return bool(rows) and rows[0]["pid"] == new_pid

        await wait_for(view_has_new_pid, "the view to show the restarted pid", 30)
        restarts = await st.sdk.audit.events(event_name="model.restarted")
        assert len(restarts) == 1


async def test_supervisor_giving_up_is_recorded_crashed_and_the_next_request_reloads(
        tmp_path: Path, model_file: Path) -> None:
    async with gateway_stack(tmp_path, model_path=model_file, prepare=fake_preparer(),
                             watch_interval_s=0.05) as st:
        client = openai.AsyncOpenAI(base_url=st.url + "/v1", api_key="unused", max_retries=0)
        await client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
        runtime = st.manager.runtimes[(st.engine_id, st.model_id)]
        sup = runtime.supervisor
        assert sup is not None
        for _ in range(4):  # the policy allows 3 restarts; the 4th crash is final
            pid = sup.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)

            async def moved_on(old: int = pid) -> bool:
                pid_now = sup.pid
                return sup.state.value in ("failed", "stopped") or (
                    sup.state.value == "ready" and pid_now is not None and pid_now != old)

            await wait_for(moved_on, "the supervisor to restart or give up", 30, 0.02)
        assert sup.state.value in ("failed", "stopped"), sup.state  # stopped once the watch reacts

        async def unloaded() -> bool:
            return await loaded(st) == [] and st.serving.orchestrator.usage() == {}

        await wait_for(unloaded, "the crashed runtime to leave the view and the gateway", 30)
        unloads = await st.sdk.audit.events(event_name="model.unloaded")
        runtime_log = [e["event_name"] for e in await st.sdk.audit.events(
            model_registry_id=st.model_id)]
        assert [e["data"]["reason"] for e in unloads] == ["crashed"], runtime_log
        answer = await client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
        assert answer.choices[0].message.content
        assert st.serving.orchestrator.loads == 2, runtime_log


async def test_runtimes_on_a_lost_node_are_unloaded_with_reason_node_lost(
        tmp_path: Path, model_file: Path) -> None:
    async with gateway_stack(tmp_path, model_path=model_file, prepare=fake_preparer(),
                             watch_interval_s=0.05) as st:
        client = openai.AsyncOpenAI(base_url=st.url + "/v1", api_key="unused", max_retries=0)
        await client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
        pid = int((await loaded(st))[0]["pid"])  # type: ignore[call-overload]
        assert await st.sdk.nodes.lost(st.node.facts.node_id, "test: the node went away")

        async def unloaded() -> bool:
            return await loaded(st) == [] and not pid_alive(pid)

        await wait_for(unloaded, "the lost node's runtime to be unloaded", 30)
        unloads = await st.sdk.audit.events(event_name="model.unloaded")
        assert [e["data"]["reason"] for e in unloads] == ["node_lost"]


async def test_unknown_model_and_bad_bodies_get_openai_errors(
        tmp_path: Path, model_file: Path) -> None:
    async with gateway_stack(tmp_path, model_path=model_file, prepare=fake_preparer()) as st:
        async with httpx.AsyncClient(base_url=st.url, timeout=60) as http:
            missing = await http.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
            assert missing.status_code == 404
            err = missing.json()["error"]
            assert err["code"] == "model_not_found" and "GET /v1/models" in err["message"]
            bad = await http.post("/v1/chat/completions", content=b"{", headers={
                "content-type": "application/json"})
            assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
            nomodel = await http.post("/v1/completions", json={"prompt": "x"})
            assert nomodel.json()["error"]["param"] == "model"
        client = openai.AsyncOpenAI(base_url=st.url + "/v1", api_key="unused")
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(**{**CHAT, "model": "nope"})  # type: ignore[call-overload]


async def test_admin_api_requires_a_token_of_this_organization(
        tmp_path: Path, model_file: Path) -> None:
    async with gateway_stack(tmp_path, model_path=model_file, prepare=fake_preparer()) as st, \
            httpx.AsyncClient(base_url=st.url, timeout=60) as http:
            none = await http.get("/api/engines")
            assert none.status_code == 401 and "ROUNDHOUSE_API_TOKEN" in none.text
            wrong = await http.get("/api/engines", headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401
            other = await http.get("/api/engines",
                                   headers={"Authorization": f"Bearer {OTHER_ORG_TOKEN}"})
            assert other.status_code == 403 and "globex" in other.text
            ok = await http.get("/api/engines",
                                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
            assert ok.status_code == 200 and ok.json()[0]["status"] == "active"
            gone = await http.get("/api/engines/999",
                                  headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
            assert gone.status_code == 404


async def test_deactivate_unloads_the_engines_runtimes(tmp_path: Path, model_file: Path) -> None:
    async with gateway_stack(tmp_path, model_path=model_file, prepare=fake_preparer()) as st:
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with httpx.AsyncClient(base_url=st.url, timeout=60, headers=headers) as http:
            warm = await http.post(f"/api/models/{st.model_id}/warmup", json={"wait": True})
            assert warm.json()["status"] == "loaded"
            pid = int((await loaded(st))[0]["pid"])  # type: ignore[call-overload]
            off = await http.post(f"/api/engines/{st.engine_id}/deactivate")
            assert off.json()["deactivated"] is True
            assert not pid_alive(pid) and await loaded(st) == []
            events = await st.sdk.audit.events(model_registry_id=st.model_id,
                                               event_name="model.unloaded")
            assert events[-1]["data"]["reason"] == "deactivated"
            refused = await http.post("/v1/chat/completions", json=CHAT)
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "engine_unavailable"


async def test_sdk_ai_handle_is_lazy_and_warmup_loads(tmp_path: Path, model_file: Path) -> None:
    from cluster.serve_sdk import LocalServing, attach_serving

    async with gateway_stack(tmp_path, model_path=model_file, prepare=fake_preparer()) as st:
        sdk = attach_serving(st.sdk, LocalServing(st.serving))
        provider = await sdk.ai.get_provider_by_model_registry_id(st.model_id)
        assert provider.model == "smollm2"
        assert await sdk.engines.list_loaded_models() == []
        assert (await sdk.ai.warmup_provider(provider, wait=True))["status"] == "loaded"
        rows = await sdk.engines.list_loaded_models(st.engine_id)
        assert len(rows) == 1 and pid_alive(int(rows[0]["pid"]))
        assert await sdk.engines.list_active_jobs() == []
        synced = await sdk.engines.sync_runtime()
        assert synced["runtime"] == {"status": "ok", "removed_apps": [], "marked_unloaded": []}
        assert len(await sdk.engines.list_loaded_models()) == 1  # sync never unloads or loads
        assert await sdk.engines.stop_engine(st.engine_id) == {"status": "ok", "stopped": True}
        assert await sdk.engines.list_loaded_models() == []
