"""The core's contract tests run once per store: embedded SQLite, and PostgreSQL when
ROUNDHOUSE_TEST_POSTGRES_URL names a server (each test gets its own schema there)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from cluster.client import SDK, open_local
from events.settings import Settings

POSTGRES_VAR = "ROUNDHOUSE_TEST_POSTGRES_URL"


def _postgres_url() -> str:
    url = os.environ.get(POSTGRES_VAR, "")
    if not url:
        pytest.skip(f"no PostgreSQL server: set {POSTGRES_VAR}=postgresql://user@host:5432/db "
                    "to run the PostgreSQL contract tests")
    return url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settings]:
    """Settings for a fresh, empty store of each kind."""
    if request.param == "sqlite":
        yield Settings(home=tmp_path / "home")
        return
    import psycopg
    from sqlalchemy.engine import make_url

    base = _postgres_url()
    url = make_url(base)
    schema = f"rh_test_{uuid.uuid4().hex[:12]}"
    dsn = f"host={url.host} port={url.port or 5432} user={url.username} dbname={url.database}"
    if url.password:
        dsn += f" password={url.password}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield Settings(home=tmp_path / "home",
                       database_url=url.update_query_dict({"schema": schema})
                       .render_as_string(hide_password=False))
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
async def sdk(settings: Settings) -> AsyncIterator[SDK]:
    client = open_local(settings=settings, node_id="head")
    try:
        yield client
    finally:
        await client.close()


WHO = {"user_id": 42, "organization_id": 7}
