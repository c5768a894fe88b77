"""The estimate as a local set-up makes it (no Cloud Run cap: a segment is the spec's own time
budget, `api.dispatch.base.segment_length`), for the tests of its memory and time."""

from __future__ import annotations

from functools import cache
from typing import Any

from api.config import Settings
from api.dispatch.base import segment_length
from api.runs import estimates
from trainer.contract.spec import RunSpec


@cache
def local_settings() -> Settings:
    """Built on first use, in a test, not when pytest imports this module: Settings reads the
    environment, which a collection-time import would read before any test has set it up."""
    return Settings(dispatcher="local", segment_seconds_max=None)


def estimate(spec: RunSpec, config: dict[str, Any] | None = None) -> estimates.Estimate:
    return estimates.estimate(spec, segment_length(local_settings(), spec), config)


def refusal_detail(spec: RunSpec, est: estimates.Estimate) -> str:
    return estimates.refusal_detail(spec, est, segment_length(local_settings(), spec))
