"""The control plane's core: the ledger, the views, one command at a time, and the checks
every command shares (ids, names, JSON, who asked). See ``actors.control_plane``."""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from eventsourcing.domain import Aggregate

from actors.errors import BadInput, Conflict, DuplicateName, NotFound
from engines.artifacts import DirectoryArtifactStore
from engines.base import EngineProvider, NodeFacts
from engines.registry import UnknownProvider, get_provider
from events.common import (
    BadRequester,
    engine_id,
    model_id,
    name_claim_id,
    requested_by_payload,
)
from events.engine import EngineInstance, EngineStatus, NameClaim
from events.ledger import ConcurrentWrite, Ledger
from events.model import ModelRegistration
from events.settings import Settings
from projections import views
from projections.projector import Projector
from projections.store import open_views

log = logging.getLogger(__name__)

MAX_ID_RETRIES = 50

Listener = Callable[[str, dict[str, Any]], None]


def _check_int_id(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise BadInput(f"{what} must be an integer id, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    raise BadInput(f"{what} must be an integer id, got {value!r}")


def _check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadInput(f"{what} must be a non-empty string, got {value!r}")
    if len(value) > 255:
        raise BadInput(f"{what} is {len(value)} characters long; the limit is 255")
    return value.strip()


def _check_json_object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise BadInput(f"{what} must be a JSON object (a dict), got {type(value).__name__}")
    try:
        # Round-trip so that only plain JSON values are ever stored in events.
        result = json.loads(json.dumps(dict(value), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise BadInput(f"{what} must hold only JSON values (str, number, bool, null, "
                       f"list, object): {exc}") from None
    assert isinstance(result, dict)
    return result


def _iso(value: str | datetime | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return value.isoformat()



class ControlCore:
    """Ledger + views + listeners; the command plumbing the command groups build on."""

    def __init__(self, settings: Settings | None = None, node_id: str | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self.ledger = Ledger(self.settings)
        self.views = open_views(self.settings)
        self.projector = Projector(self.views)
        self.source_node_id = node_id or socket.gethostname()
        self._lock = threading.RLock()
        self._listeners: list[Listener] = []
        self._last_ids: dict[str, int] = {}
        self._artifacts: DirectoryArtifactStore | None = None
        self._poller: tuple[threading.Thread, threading.Event] | None = None
        self.catch_up()

    def close(self) -> None:
        if self._poller is not None:
            thread, stop = self._poller
            stop.set()
            thread.join(timeout=5)
            self._poller = None
        self.views.dispose()
        self.ledger.close()

    # -- plumbing ----------------------------------------------------------------------------
    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(kind, detail)`` after every command that changed something."""
        self._listeners.append(listener)

    def _notify(self, kind: str, detail: dict[str, Any]) -> None:
        for listener in list(self._listeners):
            try:
                listener(kind, detail)
            except Exception:  # a listener must never undo a saved command
                log.exception("listener %r failed on %s", listener, kind)

    def catch_up(self) -> int:
        """Project every saved event not yet in the views; return how many."""
        return self.projector.catch_up(self.ledger)

    def start_polling(self, interval_s: float | None = None) -> None:
        """Catch the views up every ``interval_s`` seconds in a background thread (default
        ``ROUNDHOUSE_PROJECTION_POLL_INTERVAL_S``), for events that other writers save (a
        second control plane on PostgreSQL, a writer that crashed before projecting).
        Stopped by ``close()``."""
        if self._poller is not None:
            return
        interval = interval_s or self.settings.projection_poll_interval_s
        stop = threading.Event()

        def poll() -> None:
            while not stop.wait(interval):
                try:
                    with self._lock:
                        self.catch_up()
                except Exception:  # keep polling; the next round retries
                    log.exception("projection catch-up failed; retrying in %.1fs", interval)

        thread = threading.Thread(target=poll, name="roundhouse-projection-poll", daemon=True)
        self._poller = (thread, stop)
        thread.start()

    def _save(self, *aggregates: Aggregate) -> None:
        self.projector.apply_recorded(self.ledger, self.ledger.save_all(*aggregates))

    @contextmanager
    def _command(self) -> Iterator[None]:
        """One command at a time; a command that fails forgets the aggregates it may have
        changed in memory before failing (the ledger hands out cached aggregates)."""
        with self._lock:
            try:
                yield
            except BaseException:
                self.ledger.forget_cached()
                raise

    def _who(self, requested_by: Mapping[str, Any] | None) -> dict[str, Any]:
        try:
            return requested_by_payload(requested_by)
        except BadRequester as exc:
            raise BadInput(str(exc)) from None

    def _provider(self, provider_id: Any) -> EngineProvider:
        try:
            return get_provider(provider_id)
        except UnknownProvider as exc:
            raise BadInput(str(exc)) from None

    def _engine(self, row_id: Any) -> EngineInstance:
        rid = _check_int_id(row_id, "engine_registry_id")
        agg = self.ledger.load(engine_id(rid), EngineInstance)
        if agg is None or agg.status is EngineStatus.REMOVED:
            raise NotFound(
                f"engine registry row {rid} does not exist; list rows with "
                "sdk.models.engine_registry.list()"
            )
        return agg

    def _model(self, row_id: Any) -> ModelRegistration:
        rid = _check_int_id(row_id, "model_registry_id")
        agg = self.ledger.load(model_id(rid), ModelRegistration)
        if agg is None or agg.removed:
            raise NotFound(
                f"model registry row {rid} does not exist; list rows with "
                "sdk.models.model_registry.list()"
            )
        return agg

    def _engine_payload(self, row_id: int) -> dict[str, Any]:
        with self.views.connect() as conn:
            row = views.engine_row(conn, row_id)
        assert row is not None, f"engine {row_id} saved but not projected"
        return views.engine_payload(row)

    def _claim(self, kind: str, name: str, owner: int,
               requested_by: dict[str, Any] | None = None) -> NameClaim:
        claim = self.ledger.load(name_claim_id(kind, name), NameClaim)
        if claim is None:
            return NameClaim(kind=kind, name=name, owner_row_id=owner,
                             requested_by=requested_by)
        if claim.owner_row_id is not None:
            raise DuplicateName(
                f"{kind} name {name!r} is already used by {kind} {claim.owner_row_id}; "
                "choose another name or delete that row first"
            )
        claim.reclaim(owner, requested_by)
        return claim

    def _release(self, kind: str, name: str,
                 requested_by: dict[str, Any] | None = None) -> NameClaim:
        claim = self.ledger.load(name_claim_id(kind, name), NameClaim)
        assert claim is not None, f"{kind} name {name!r} has no claim"
        claim.release(requested_by)
        return claim

    def _create_with_new_id(self, kind: str, name: str, next_id: Callable[[], int],
                            build: Callable[[int], Aggregate],
                            requested_by: dict[str, Any]) -> int:
        """Allocate the next integer id and claim the name without races.

        Optimistic: the save creates a fresh name claim; if it conflicts, the stored
        claim says whether the name is taken (refused), was released (reclaimed), or
        whether it was the id that another writer took (retry with the next id).
        """
        row_id = max(next_id(), self._last_ids.get(kind, 0) + 1)
        claim: NameClaim | None = None
        for _ in range(MAX_ID_RETRIES):
            if claim is None:
                claim = NameClaim(kind=kind, name=name, owner_row_id=row_id,
                                  requested_by=requested_by)
            try:
                recordings = self.ledger.save_all(build(row_id), claim)
            except ConcurrentWrite:
                stored = self.ledger.load(name_claim_id(kind, name), NameClaim)
                if stored is not None and stored.owner_row_id is not None:
                    raise DuplicateName(
                        f"{kind} name {name!r} is already used by {kind} "
                        f"{stored.owner_row_id}; choose another name or delete that row first"
                    ) from None
                if stored is not None and claim.version == 1:
                    claim = stored  # the name was released: take it over at this id
                    claim.reclaim(row_id, requested_by)
                else:
                    row_id += 1  # another writer took this id
                    claim = None
                continue
            self.projector.apply_recorded(self.ledger, recordings)
            self._last_ids[kind] = row_id
            return row_id
        raise Conflict(f"could not allocate a {kind} id after {MAX_ID_RETRIES} tries; retry")

    # -- engine registry ---------------------------------------------------------------------
    def _alive_facts(self) -> list[NodeFacts]:
        with self.views.connect() as conn:
            return [NodeFacts.model_validate({**n.facts, "node_id": n.node_id})
                    for n in views.alive_nodes(conn)]

