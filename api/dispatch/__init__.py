"""Dispatchers start trainer executions: `LocalDispatcher` (subprocesses, the embedded default)
and `CloudRunDispatcher` (Cloud Run Jobs). `make_dispatcher` picks one by settings."""

from __future__ import annotations

from api.config import Settings
from api.dispatch.base import Dispatcher


def make_dispatcher(settings: Settings) -> Dispatcher:
    """The dispatcher `settings.dispatcher` names (imported lazily: the Cloud Run one pulls in
    the Google client libraries, which a local set-up never needs)."""
    if settings.dispatcher == "local":
        from api.dispatch.local import LocalDispatcher

        return LocalDispatcher(settings)
    if settings.dispatcher == "cloudrun":
        from api.dispatch.cloudrun import CloudRunDispatcher

        return CloudRunDispatcher(settings)
    raise ValueError(f"no dispatcher named {settings.dispatcher!r}")
