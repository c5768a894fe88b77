"""The dispatch worker (issue 4 fills this in)."""

from __future__ import annotations

from sqlalchemy import Engine

from api.config import Settings


class Worker:
    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings, self.engine = settings, engine

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass
