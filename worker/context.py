"""What a task needs besides the job id: settings, the database and the artifact store."""
from __future__ import annotations

from dataclasses import dataclass

from store.artifacts import ArtifactStore, store_for
from store.db import Database, database_for
from store.settings import Settings


@dataclass
class ServiceContext:
    settings: Settings
    db: Database
    store: ArtifactStore

    @classmethod
    def from_settings(cls, settings: Settings) -> "ServiceContext":
        return cls(settings, database_for(settings), store_for(settings.resolved_artifact_dir))
