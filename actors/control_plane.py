"""The control plane: the single writer of the ledger and the owner of the views.

Plain Python, no Ray: the in-process SDK (``cluster.client.open_local``) calls
it directly and the control-plane actor wraps it. Every command validates its
input, changes aggregates, saves them in one transaction and catches the views
up before returning (read-your-writes), then tells its listeners (node agents,
the runtime manager) that something changed.

The commands live in groups: ``control_core`` (ledger, views, shared checks),
``control_engines`` (registry, installs, nodes, activation, providers) and
``control_models`` (models, artifacts, estimates, runtimes); this module joins
them and adds the audit log.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from actors.control_core import _check_int_id, _iso
from actors.control_engines import EngineCommands
from actors.control_models import ModelCommands
from actors.errors import BadInput
from projections import views
from projections.projector import Projector
from projections.store import rebuild, verify


class ControlPlane(EngineCommands, ModelCommands):
    """Ledger + projections + providers. Thread-safe: commands run one at a time."""

    # -- audit -------------------------------------------------------------------------------
    def audit_events(self, engine_registry_id: Any = None, model_registry_id: Any = None,
                     user_id: int | str | None = None,
                     organization_id: int | str | None = None, node_id: str | None = None,
                     event_name: str | None = None, since: str | datetime | None = None,
                     until: str | datetime | None = None, after_position: int = 0,
                     limit: int = 1000) -> list[dict[str, Any]]:
        """The event log, oldest first, filtered by any of the arguments."""
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise BadInput(f"limit must be a positive integer, got {limit!r}")
        with self.views.connect() as conn:
            return views.audit_events(
                conn,
                engine_registry_id=None if engine_registry_id is None
                else _check_int_id(engine_registry_id, "engine_registry_id"),
                model_registry_id=None if model_registry_id is None
                else _check_int_id(model_registry_id, "model_registry_id"),
                user_id=user_id, organization_id=organization_id, node_id=node_id,
                event_name=event_name, since=_iso(since), until=_iso(until),
                after_position=after_position, limit=limit,
            )

    def verify(self) -> dict[str, Any]:
        """Rebuild the views from the log in a scratch database and diff with the live ones."""
        with self._command():
            return verify(self.views, self.ledger)

    def rebuild(self) -> int:
        """Drop the view rows and replay the whole log into them; return events applied."""
        with self._command():
            self.projector = Projector(self.views)
            applied = rebuild(self.views, self.ledger)
            return applied

