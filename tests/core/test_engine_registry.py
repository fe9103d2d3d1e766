"""engine_registry: payload shapes, integer ids, configuration-only updates, bad input."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import WHO

from actors.errors import BadInput, DuplicateName, LifecycleFieldRefused, NotFound
from cluster.client import SDK

ROW_KEYS = {"id", "provider", "name", "config", "organization_id", "status", "supported",
            "last_install_event_id", "install_error", "created_at", "updated_at"}


async def _positions(sdk: SDK) -> int:
    return len(await sdk.audit.events(limit=100_000))


async def test_create_returns_row_with_sequential_integer_ids(sdk: SDK) -> None:
    a = await sdk.models.engine_registry.create(provider="llamacpp", name="cpu",
                                                config={"ctx_size": 4096}, requested_by=WHO)
    b = await sdk.models.engine_registry.create(provider="openai", name="remote")
    c = await sdk.models.engine_registry.create(provider="vllm", name="gpu")
    assert [a["id"], b["id"], c["id"]] == [1, 2, 3]
    assert set(a) == ROW_KEYS
    assert a["provider"] == "llamacpp" and a["name"] == "cpu"
    assert a["config"] == {"ctx_size": 4096}
    assert a["status"] == "registered" and a["supported"] is False
    assert a["organization_id"] == 7
    assert await sdk.models.engine_registry.get(1) == a
    assert [r["id"] for r in await sdk.models.engine_registry.list()] == [1, 2, 3]
    assert [r["id"] for r in await sdk.models.engine_registry.list(provider="vllm")] == [3]


async def test_update_changes_config_and_name(sdk: SDK) -> None:
    row = await sdk.models.engine_registry.create(provider="openai", name="remote")
    updated = await sdk.models.engine_registry.update(
        row["id"], config={"base_url": "http://127.0.0.1:9/v1", "api_key": "k"}, name="remote2")
    assert updated["name"] == "remote2"
    assert updated["config"]["base_url"] == "http://127.0.0.1:9/v1"
    # The old name is free again; the new one is taken.
    await sdk.models.engine_registry.create(provider="openai", name="remote")
    with pytest.raises(DuplicateName, match="remote2"):
        await sdk.models.engine_registry.create(provider="openai", name="remote2")


@pytest.mark.parametrize("field", ["status", "supported", "install_status", "provider", "id"])
async def test_update_refuses_lifecycle_fields(sdk: SDK, field: str) -> None:
    row = await sdk.models.engine_registry.create(provider="llamacpp", name="cpu")
    before = await _positions(sdk)
    with pytest.raises(LifecycleFieldRefused) as err:
        await sdk.models.engine_registry.update(row["id"], **{field: "active"})
    assert field in str(err.value)
    assert "use " in str(err.value)  # names the method to use instead
    assert await _positions(sdk) == before
    assert (await sdk.models.engine_registry.get(row["id"]))["status"] == "registered"


async def test_update_status_names_lifecycle_methods(sdk: SDK) -> None:
    row = await sdk.models.engine_registry.create(provider="llamacpp", name="cpu")
    with pytest.raises(LifecycleFieldRefused, match="activate_instance"):
        await sdk.models.engine_registry.update(row["id"], status="active")


async def test_unchanged_update_records_no_event(sdk: SDK) -> None:
    row = await sdk.models.engine_registry.create(provider="llamacpp", name="cpu",
                                                  config={"ctx_size": 512})
    before = await _positions(sdk)
    again = await sdk.models.engine_registry.update(row["id"], config={"ctx_size": 512},
                                                    name="cpu")
    assert again == row
    assert await _positions(sdk) == before


async def test_delete_frees_the_name_and_hides_the_row(sdk: SDK) -> None:
    row = await sdk.models.engine_registry.create(provider="llamacpp", name="cpu")
    assert (await sdk.models.engine_registry.delete(row["id"]))["deleted"] is True
    with pytest.raises(NotFound, match=r"engine_registry\.list"):
        await sdk.models.engine_registry.get(row["id"])
    again = await sdk.models.engine_registry.create(provider="llamacpp", name="cpu")
    assert again["id"] == row["id"] + 1
    assert await sdk.models.engine_registry.list() == [again]


BAD_CREATES: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"provider": "ollama", "name": "x"}, BadInput, "known providers: llamacpp, openai, vllm"),
    ({"provider": "llamacpp", "name": ""}, BadInput, "name must be a non-empty string"),
    ({"provider": "llamacpp", "name": 5}, BadInput, "name must be a non-empty string"),
    ({"provider": "llamacpp", "name": "x", "config": "ctx=4"}, BadInput, "JSON object"),
    ({"provider": "llamacpp", "name": "x", "config": {"f": {1, 2}}}, BadInput, "JSON values"),
    ({"provider": "llamacpp", "name": "x", "config": {"ctx_size": "big"}}, BadInput,
     "ctx_size"),
    ({"provider": "llamacpp", "name": "x", "config": {"colour": "red"}}, BadInput, "colour"),
    ({"provider": "llamacpp", "name": "x", "requested_by": {"user": 1}}, BadInput,
     "requested_by"),
    ({"provider": "llamacpp", "name": "x", "requested_by": "alice"}, BadInput, "requested_by"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_CREATES)
async def test_bad_create_is_refused_and_changes_nothing(
    sdk: SDK, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    await sdk.models.engine_registry.create(provider="llamacpp", name="existing")
    before = await _positions(sdk)
    with pytest.raises(error, match=message.replace("(", r"\(")):
        await sdk.models.engine_registry.create(**kwargs)
    assert await _positions(sdk) == before
    assert len(await sdk.models.engine_registry.list()) == 1


async def test_duplicate_name_is_refused_and_changes_nothing(sdk: SDK) -> None:
    await sdk.models.engine_registry.create(provider="llamacpp", name="cpu")
    before = await _positions(sdk)
    with pytest.raises(DuplicateName, match="already used by engine 1"):
        await sdk.models.engine_registry.create(provider="vllm", name="cpu")
    assert await _positions(sdk) == before


@pytest.mark.parametrize("bad_id", [99, "abc", None, 1.5, True])
async def test_unknown_or_malformed_ids_are_refused(sdk: SDK, bad_id: Any) -> None:
    await sdk.models.engine_registry.create(provider="llamacpp", name="cpu")
    error = NotFound if bad_id == 99 else BadInput
    with pytest.raises(error):
        await sdk.models.engine_registry.get(bad_id)
    with pytest.raises(error):
        await sdk.engines.begin_install(bad_id)
    with pytest.raises(error):
        await sdk.engines.install_status(bad_id)
    with pytest.raises(error):
        await sdk.engines.activate_instance(bad_id)


async def test_bad_update_config_changes_nothing(sdk: SDK) -> None:
    row = await sdk.models.engine_registry.create(provider="vllm", name="gpu")
    before = await _positions(sdk)
    with pytest.raises(BadInput, match="gpu_memory_utilization"):
        await sdk.models.engine_registry.update(row["id"], config={"gpu_memory_utilization": 3})
    with pytest.raises(BadInput, match="unknown engine fields"):
        await sdk.models.engine_registry.update(row["id"], colour="red")
    assert await _positions(sdk) == before
    assert (await sdk.models.engine_registry.get(row["id"]))["config"] == {}
